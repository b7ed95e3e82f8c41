//! The sequential specification of one key: what each operation does to the
//! key's value and which outputs it may give. `None` is a missing key.

use super::{KvInput, KvOutput};

/// The value of one key.
pub(super) type State = Option<String>;

/// Where an operation leaves the key.
pub(super) enum Transition {
    Unchanged,
    To(State),
}

/// Applies `input` to `state`; `None` when `output` is not what the
/// operation would have answered in `state`. An unknown output (`None`)
/// accepts whatever the operation answers.
pub(super) fn step(
    state: &State,
    input: &KvInput,
    output: Option<&KvOutput>,
) -> Option<Transition> {
    let current = state.as_deref().unwrap_or("");
    let (transition, answer) = match input {
        KvInput::Get { .. } => (
            Transition::Unchanged,
            KvOutput::Get {
                value: state.clone(),
            },
        ),
        KvInput::Put { value, .. } => (Transition::To(Some(value.clone())), KvOutput::Put),
        KvInput::Append { value, .. } => (
            Transition::To(Some(format!("{current}{value}"))),
            KvOutput::Append,
        ),
        KvInput::Delete { .. } => (
            Transition::To(None),
            KvOutput::Delete {
                existed: state.is_some(),
            },
        ),
        KvInput::Cas {
            expected, value, ..
        } => {
            let swapped = current == expected;
            let transition = if swapped {
                Transition::To(Some(value.clone()))
            } else {
                Transition::Unchanged
            };
            let answer = KvOutput::Cas {
                swapped,
                found: state.is_some(),
                current: Some(current.to_string()),
            };
            (transition, answer)
        }
    };
    match output {
        Some(output) if !matches_answer(output, &answer) => None,
        _ => Some(transition),
    }
}

/// True when the observed output is the model's answer; a Cas output without
/// `current` matches on `swapped` and `found` alone.
fn matches_answer(observed: &KvOutput, answer: &KvOutput) -> bool {
    match (observed, answer) {
        (
            KvOutput::Cas {
                swapped,
                found,
                current: None,
            },
            KvOutput::Cas {
                swapped: model_swapped,
                found: model_found,
                ..
            },
        ) => swapped == model_swapped && found == model_found,
        _ => observed == answer,
    }
}
