//! The terms of the entries the WAL holds after the snapshot, kept in
//! memory as runs of equal terms, so that `save_snapshot` can tell whether
//! a snapshot matches the stored log and `append` can check its input
//! without reading the disk. A run costs 16 bytes however many entries it
//! covers, and terms change rarely.

/// Invariant: runs are sorted by `first_index`, their terms strictly
/// increase, the first run starts at `base_index + 1`, and the last run ends
/// at `last_index`. No runs means no entries after `base_index`, and then
/// `last_index == base_index`.
#[derive(Debug, Default)]
pub(crate) struct TermRuns {
    base_index: u64,
    last_index: u64,
    runs: Vec<(u64, u64)>,
}

impl TermRuns {
    /// No entries; the next entry will be `base_index + 1`.
    pub(crate) fn new(base_index: u64) -> TermRuns {
        TermRuns {
            base_index,
            last_index: base_index,
            runs: Vec::new(),
        }
    }

    pub(crate) fn last_index(&self) -> u64 {
        self.last_index
    }

    /// The term of the entry at `index`, if an entry after the base holds it.
    pub(crate) fn term_at(&self, index: u64) -> Option<u64> {
        if index <= self.base_index || index > self.last_index {
            return None;
        }
        let position = self.runs.partition_point(|&(first, _)| first <= index);
        Some(self.runs[position - 1].1)
    }

    /// Drops the entries at `>= index`.
    pub(crate) fn truncate_from(&mut self, index: u64) {
        assert!(
            index > self.base_index,
            "truncate at {index} below the base"
        );
        if index > self.last_index {
            return;
        }
        self.runs.retain(|&(first, _)| first < index);
        self.last_index = index - 1;
    }

    /// Appends the entry `index` with `term`, right after the last one.
    pub(crate) fn push(&mut self, index: u64, term: u64) {
        assert_eq!(index, self.last_index + 1, "entries must be contiguous");
        match self.runs.last() {
            Some(&(_, last_term)) if last_term == term => {}
            Some(&(_, last_term)) => {
                assert!(term > last_term, "term {term} after {last_term}");
                self.runs.push((index, term));
            }
            None => self.runs.push((index, term)),
        }
        self.last_index = index;
    }

    /// Forgets the entries at `<= index`, which a snapshot now covers.
    pub(crate) fn compact_to(&mut self, index: u64) {
        if index <= self.base_index {
            return;
        }
        if index >= self.last_index {
            *self = TermRuns::new(index);
            return;
        }
        let position = self.runs.partition_point(|&(first, _)| first <= index);
        self.runs.drain(..position - 1);
        // The run holding `index` now starts after it; if it ended at
        // `index`, the next run already starts there and this one goes.
        if self.runs.len() > 1 && self.runs[1].0 == index + 1 {
            self.runs.remove(0);
        }
        self.runs[0].0 = index + 1;
        self.base_index = index;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_track_terms_through_truncation_and_compaction() {
        let mut terms = TermRuns::new(0);
        for (index, term) in [(1, 1), (2, 1), (3, 2), (4, 2), (5, 4)] {
            terms.push(index, term);
        }
        assert_eq!(terms.term_at(0), None);
        assert_eq!(terms.term_at(2), Some(1));
        assert_eq!(terms.term_at(4), Some(2));
        assert_eq!(terms.term_at(5), Some(4));
        assert_eq!(terms.term_at(6), None);
        terms.truncate_from(4);
        assert_eq!(terms.last_index(), 3);
        terms.push(4, 5);
        assert_eq!(terms.term_at(4), Some(5));
        terms.compact_to(2);
        assert_eq!(terms.term_at(2), None);
        assert_eq!(terms.term_at(3), Some(2));
        terms.compact_to(3);
        assert_eq!(terms.runs, vec![(4, 5)]);
        terms.compact_to(9);
        assert_eq!(terms.last_index(), 9);
        assert_eq!(terms.term_at(4), None);
    }
}
