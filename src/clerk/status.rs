//! The JSON of one node's status, as `clerk status --json` prints it and
//! the node's own HTTP `/status` serves it: one function, so the two cannot
//! drift apart.

use serde_json::Value;

use super::NodeStatusView;

/// A JSON object with its keys in the given order (serde_json's maps sort
/// them), so answers read `{"ok":true,...}` as documented.
pub fn json_object(fields: &[(&str, Value)]) -> String {
    let body: Vec<String> = fields
        .iter()
        .map(|(key, value)| format!("{}:{value}", Value::from(*key)))
        .collect();
    format!("{{{}}}", body.join(","))
}

impl NodeStatusView {
    /// The node's address as text, `-` when unknown.
    pub fn addr_text(&self) -> String {
        self.addr
            .map_or_else(|| "-".to_string(), |addr| addr.to_string())
    }

    /// `{"id":..,"addr":..,"role":..,"term":..,"leader":..,"commit":..,
    /// "applied":..,"last_index":..,"snapshot_index":..,"log_bytes":..}`;
    /// an unreachable node has role `unreachable`, nulls and an `error`.
    pub fn to_json(&self) -> String {
        let (role, numbers, error) = match &self.status {
            Ok(s) => (
                Value::from(s.role.as_str()),
                [
                    s.term,
                    s.leader,
                    s.commit,
                    s.applied,
                    s.last_index,
                    s.snapshot_index,
                    s.log_bytes,
                ]
                .map(Value::from),
                None,
            ),
            Err(error) => (
                Value::from("unreachable"),
                std::array::from_fn(|_| Value::Null),
                Some(error),
            ),
        };
        let [term, leader, commit, applied, last_index, snapshot_index, log_bytes] = numbers;
        let mut fields = vec![
            ("id", Value::from(self.id)),
            ("addr", Value::from(self.addr_text())),
            ("role", role),
            ("term", term),
            ("leader", leader),
            ("commit", commit),
            ("applied", applied),
            ("last_index", last_index),
            ("snapshot_index", snapshot_index),
            ("log_bytes", log_bytes),
        ];
        if let Some(error) = error {
            fields.push(("error", Value::from(error.as_str())));
        }
        json_object(&fields)
    }
}
