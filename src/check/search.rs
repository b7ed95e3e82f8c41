//! The Wing & Gong search with Lowe's memoization, as Porcupine runs it on
//! one key's history. The history becomes a doubly linked list of call and
//! return events in time order. The search walks it from the front: at a
//! call it tries to linearize that operation now (the model accepts its
//! output in the current state and the pair (linearized set, new state) is
//! new), lifting the call and its return out of the list; at a return whose
//! call is not yet linearized it must backtrack, undoing the last choice.
//! The history is linearizable when the list empties.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use super::model::{self, State, Transition};
use super::{KvInput, KvOutput, Operation};

pub(super) enum Outcome {
    Linearizable,
    NotLinearizable,
    Timeout,
}

/// No neighbour: the end of the list.
const NIL: usize = usize::MAX;
/// The list's sentinel head; event nodes follow it.
const HEAD: usize = 0;
/// How many search steps run between two looks at the clock.
const STEPS_PER_CLOCK_CHECK: u64 = 1024;

#[derive(Clone, Copy)]
struct Node {
    prev: usize,
    next: usize,
    op: usize,
    is_call: bool,
    /// For a call, the node of its return.
    matching: usize,
}

/// The event list. Invariant: the nodes reachable from `HEAD` are the events
/// of the operations not yet linearized, in time order; a lifted node keeps
/// its own links so that it can be put back (in reverse order of lifting).
struct Events {
    nodes: Vec<Node>,
}

impl Events {
    /// Calls come before returns at equal times, so operations that touch
    /// count as concurrent (the permissive reading, as Porcupine's). An
    /// operation of unknown outcome returns at infinity.
    fn new(ops: &[Operation]) -> Events {
        let mut events: Vec<(u64, bool, usize)> = Vec::with_capacity(2 * ops.len());
        for (i, op) in ops.iter().enumerate() {
            let return_us = match (op.is_known(), op.return_us) {
                (true, Some(return_us)) => return_us.max(op.call_us),
                _ => u64::MAX,
            };
            events.push((op.call_us, false, i));
            events.push((return_us, true, i));
        }
        events.sort_unstable();
        let head = Node {
            prev: NIL,
            next: NIL,
            op: NIL,
            is_call: false,
            matching: NIL,
        };
        let mut nodes = vec![head];
        let mut return_node = vec![NIL; ops.len()];
        for (k, &(_, is_return, op)) in events.iter().enumerate() {
            let index = k + 1;
            nodes[index - 1].next = index;
            nodes.push(Node {
                prev: index - 1,
                next: NIL,
                op,
                is_call: !is_return,
                matching: NIL,
            });
            if is_return {
                return_node[op] = index;
            }
        }
        for node in nodes.iter_mut().filter(|node| node.is_call) {
            node.matching = return_node[node.op];
        }
        Events { nodes }
    }

    fn unlink(&mut self, index: usize) {
        let Node { prev, next, .. } = self.nodes[index];
        self.nodes[prev].next = next;
        if next != NIL {
            self.nodes[next].prev = prev;
        }
    }

    fn relink(&mut self, index: usize) {
        let Node { prev, next, .. } = self.nodes[index];
        self.nodes[prev].next = index;
        if next != NIL {
            self.nodes[next].prev = index;
        }
    }

    /// Takes a call and its return out of the list.
    fn lift(&mut self, call: usize) {
        self.unlink(call);
        self.unlink(self.nodes[call].matching);
    }

    /// Undoes the last `lift`, which must have been of `call`.
    fn unlift(&mut self, call: usize) {
        self.relink(self.nodes[call].matching);
        self.relink(call);
    }
}

/// Key states seen so far, each stored once and named by a small number so
/// that the memo holds numbers rather than copies of long values.
#[derive(Default)]
struct States {
    values: Vec<State>,
    ids: HashMap<State, u32>,
}

impl States {
    fn intern(&mut self, state: State) -> u32 {
        if let Some(&id) = self.ids.get(&state) {
            return id;
        }
        let id = u32::try_from(self.values.len())
            .expect("fewer than 2^32 states fit in the memo budget");
        self.values.push(state.clone());
        self.ids.insert(state, id);
        id
    }
}

/// Decides whether one key's operations are linearizable, starting from a
/// missing key. Gives up with `Timeout` at `deadline` or once the memo holds
/// `max_cache_entries` pairs.
pub(super) fn linearizable(
    ops: &[Operation],
    deadline: Instant,
    max_cache_entries: usize,
) -> Outcome {
    let mut events = Events::new(ops);
    let witness = append_only_witness(ops);
    let mut states = States::default();
    let mut state = states.intern(None);
    let mut linearized = vec![0u64; ops.len().div_ceil(64)];
    let mut cache: HashSet<(Box<[u64]>, u32)> = HashSet::new();
    // The choices made so far: each linearized call and the state before it.
    let mut calls: Vec<(usize, u32)> = Vec::with_capacity(ops.len());
    let mut entry = events.nodes[HEAD].next;
    let mut steps = 0u64;
    while events.nodes[HEAD].next != NIL {
        if steps.is_multiple_of(STEPS_PER_CLOCK_CHECK) && Instant::now() >= deadline {
            return Outcome::Timeout;
        }
        steps += 1;
        assert_ne!(entry, NIL, "the list always ends with a return event");
        let node = events.nodes[entry];
        if !node.is_call {
            // An operation returned before being linearized: undo the last choice.
            let Some((call, previous_state)) = calls.pop() else {
                return Outcome::NotLinearizable;
            };
            state = previous_state;
            let op = events.nodes[call].op;
            linearized[op / 64] &= !(1 << (op % 64));
            events.unlift(call);
            entry = events.nodes[call].next;
            continue;
        }
        let op = &ops[node.op];
        let output = if op.is_known() {
            op.output.as_ref()
        } else {
            None
        };
        let Some(transition) = model::step(&states.values[state as usize], &op.input, output)
        else {
            entry = node.next;
            continue;
        };
        let new_state = match transition {
            Transition::Unchanged => state,
            Transition::To(value) if !on_chain(witness, &value) => {
                entry = node.next;
                continue;
            }
            Transition::To(value) => states.intern(value),
        };
        let mut with_op = linearized.clone();
        with_op[node.op / 64] |= 1 << (node.op % 64);
        if !cache.insert((with_op.into_boxed_slice(), new_state)) {
            entry = node.next;
            continue;
        }
        if cache.len() > max_cache_entries {
            return Outcome::Timeout;
        }
        calls.push((entry, state));
        state = new_state;
        linearized[node.op / 64] |= 1 << (node.op % 64);
        events.lift(entry);
        entry = events.nodes[HEAD].next;
    }
    Outcome::Linearizable
}

/// For a key that only ever sees appends and gets, the longest value a get
/// returned: every state of any linearization is then a prefix of it or
/// extends it. Appends only lengthen the value, so the states of one
/// linearization form a chain of prefixes, and that get's value is one of
/// them. `None` when the key sees other operations (or no get saw a value).
fn append_only_witness(ops: &[Operation]) -> Option<&str> {
    let mut longest: Option<&str> = None;
    for op in ops {
        match (&op.input, &op.output) {
            (KvInput::Append { .. }, _) => {}
            (KvInput::Get { .. }, Some(KvOutput::Get { value })) => {
                if let Some(value) = value.as_deref() {
                    if longest.is_none_or(|l| value.len() > l.len()) {
                        longest = Some(value);
                    }
                }
            }
            (KvInput::Get { .. }, _) => {}
            _ => return None,
        }
    }
    longest
}

/// Whether `state` can lie on the chain of states through `witness`: a
/// branch that leaves the chain can never reach the get that saw it, so the
/// search skips it at once instead of exploring every order of the appends
/// before it (which grows factorially with the appends in flight).
fn on_chain(witness: Option<&str>, state: &State) -> bool {
    match (witness, state.as_deref()) {
        (Some(witness), Some(value)) => witness.starts_with(value) || value.starts_with(witness),
        _ => true,
    }
}
