//! The table `clerk status` prints: one line per node, unreachable and
//! refusing nodes included, so an operator sees the whole cluster at once.

use super::args::Exit;
use crate::clerk::{Clerk, NodeStatusView};

pub(super) const STATUS_HEADER: &str = "ID  ADDRESS               ROLE           TERM    LEADER  COMMIT      APPLIED     LOG_BYTES     SNAPSHOT";

/// One node's line of the table, under `STATUS_HEADER`.
pub(super) fn status_line(view: &NodeStatusView) -> String {
    let addr = view.addr_text();
    match &view.status {
        Ok(s) => format!(
            "{:<3} {:<21} {:<14} {:<7} {:<7} {:<11} {:<11} {:<13} {}",
            view.id,
            addr,
            s.role,
            s.term,
            s.leader,
            s.commit,
            s.applied,
            s.log_bytes,
            s.snapshot_index
        ),
        Err(error) => {
            let role = if view.rejected {
                "refused"
            } else {
                "unreachable"
            };
            format!("{:<3} {:<21} {:<14} {error}", view.id, addr, role)
        }
    }
}

/// `clerk status`: every node's view, as a table or JSON; exit 0 when any node
/// answered.
pub(super) fn run_status(clerk: &Clerk, json: bool) -> Exit {
    let views = clerk.status_all();
    if json {
        let objects: Vec<String> = views.iter().map(NodeStatusView::to_json).collect();
        println!("[{}]", objects.join(","));
    } else {
        println!("{STATUS_HEADER}");
        for view in &views {
            println!("{}", status_line(view));
        }
    }
    let refusal = views
        .iter()
        .find_map(|view| view.status.as_ref().err().filter(|_| view.rejected));
    if views.iter().any(|view| view.status.is_ok()) {
        Exit::Ok
    } else if let Some(error) = refusal {
        eprintln!("clerk: request rejected: {error}");
        Exit::Usage
    } else {
        eprintln!("clerk: no node answered: the cluster is unreachable");
        Exit::Failed
    }
}
