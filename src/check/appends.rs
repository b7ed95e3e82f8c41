//! The append-order rule of the KV tests: client `c` appends the elements
//! `x c j y` for j = 0, 1, 2, ... to one key, and in the final value every
//! acknowledged element appears exactly once, each client's in the order it
//! appended them. (Unacknowledged elements may appear or not.) The leading
//! `x ` and trailing ` y` keep "x 1 1 y" from matching inside "x 1 11 y".

use std::fmt;

/// How the final value breaks the rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AppendViolation {
    /// An acknowledged element is not in the value: a lost append.
    Missing { client: u64, element: String },
    /// An element appears more than once: an append applied twice.
    Duplicated { client: u64, element: String },
    /// An element comes before one the same client appended earlier.
    OutOfOrder {
        client: u64,
        element: String,
        earlier: String,
    },
}

impl fmt::Display for AppendViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AppendViolation::Missing { client, element } => {
                write!(
                    f,
                    "client {client}: acknowledged append {element:?} is missing"
                )
            }
            AppendViolation::Duplicated { client, element } => {
                write!(
                    f,
                    "client {client}: append {element:?} appears more than once"
                )
            }
            AppendViolation::OutOfOrder {
                client,
                element,
                earlier,
            } => {
                write!(
                    f,
                    "client {client}: append {element:?} comes before the earlier {earlier:?}"
                )
            }
        }
    }
}

impl std::error::Error for AppendViolation {}

/// Checks `final_value` against the acknowledged `(client, element)` pairs,
/// given per client in the order that client appended them (clients may
/// interleave in the slice).
pub fn check_appends(final_value: &str, acked: &[(u64, String)]) -> Result<(), AppendViolation> {
    // The position of each client's last element so far: (offset, element).
    let mut last: std::collections::HashMap<u64, (usize, &str)> = std::collections::HashMap::new();
    for (client, element) in acked {
        let (client, element) = (*client, element.as_str());
        let offset = final_value
            .find(element)
            .ok_or_else(|| AppendViolation::Missing {
                client,
                element: element.to_string(),
            })?;
        if final_value.rfind(element) != Some(offset) {
            return Err(AppendViolation::Duplicated {
                client,
                element: element.to_string(),
            });
        }
        if let Some(&(earlier_offset, earlier)) = last.get(&client) {
            if offset < earlier_offset {
                let (element, earlier) = (element.to_string(), earlier.to_string());
                return Err(AppendViolation::OutOfOrder {
                    client,
                    element,
                    earlier,
                });
            }
        }
        last.insert(client, (offset, element));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn element(client: u64, j: u64) -> (u64, String) {
        (client, format!("x {client} {j} y"))
    }

    #[test]
    fn in_order_once_each_passes() {
        let value = "x 1 0 yx 2 0 yx 1 1 yx 2 1 yx 1 11 y";
        let acked = [
            element(1, 0),
            element(2, 0),
            element(1, 1),
            element(2, 1),
            element(1, 11),
        ];
        assert_eq!(check_appends(value, &acked), Ok(()));
        // Unacknowledged elements in the value are fine.
        assert_eq!(check_appends(value, &[element(1, 0)]), Ok(()));
    }

    #[test]
    fn violations_are_named() {
        assert_eq!(
            check_appends("x 1 0 y", &[element(1, 0), element(1, 1)]),
            Err(AppendViolation::Missing {
                client: 1,
                element: "x 1 1 y".into()
            })
        );
        assert_eq!(
            check_appends("x 1 0 yx 1 0 y", &[element(1, 0)]),
            Err(AppendViolation::Duplicated {
                client: 1,
                element: "x 1 0 y".into()
            })
        );
        let error = check_appends("x 1 1 yx 1 0 y", &[element(1, 0), element(1, 1)]).unwrap_err();
        assert_eq!(
            error.to_string(),
            r#"client 1: append "x 1 1 y" comes before the earlier "x 1 0 y""#
        );
    }
}
