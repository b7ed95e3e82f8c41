//! WAL segment files: their names, and reading one back at open time.
//!
//! Segments are named `wal-<seq>.log` with a 20-digit, zero-padded sequence
//! number, so their names sort in write order and a gap in the numbers means
//! a file is missing. Only the last segment can hold a torn write: a segment
//! is fsynced before the next one is started.

use std::path::Path;

use super::error::StorageError;
use super::record::{self, FrameError, Record, HEADER_BYTES};

const SEGMENT_PREFIX: &str = "wal-";
const SEGMENT_SUFFIX: &str = ".log";

/// How many body bytes the search for a valid record after a damaged one may
/// checksum. Past this budget recovery gives up and reports corruption, which
/// loses nothing; it only bounds the time a pathological file can take.
const TAIL_SEARCH_BUDGET_BYTES: u64 = 1 << 30;

pub(crate) fn segment_file_name(seq: u64) -> String {
    format!("{SEGMENT_PREFIX}{seq:020}{SEGMENT_SUFFIX}")
}

/// The sequence number of a segment file name, or `None` for other files.
pub(crate) fn parse_segment_file_name(name: &str) -> Option<u64> {
    let digits = name
        .strip_prefix(SEGMENT_PREFIX)?
        .strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// A segment's records, as read back at open time.
pub(crate) struct ScannedSegment {
    /// Every intact record with the offset where it starts.
    pub records: Vec<(u64, Record)>,
    /// The length of the intact prefix: the whole file unless the tail is torn or
    /// preallocated zeroes (`torn` is then `None`).
    pub valid_bytes: u64,
    /// Set when the last segment ends in a torn write at `valid_bytes`.
    pub torn: Option<String>,
}

/// Reads the records of one segment whose bytes are `bytes`. A damaged record
/// is a torn tail only in the last segment and only when no intact record
/// follows it; anything else is corruption, reported with file and offset.
pub(crate) fn scan_segment(
    path: &Path,
    bytes: &[u8],
    is_last: bool,
) -> Result<ScannedSegment, StorageError> {
    let mut records = Vec::new();
    let mut offset = 0usize;
    while offset < bytes.len() {
        match record::frame_at(bytes, offset) {
            Ok((body, next)) => {
                let record = record::decode_body(body)
                    .map_err(|reason| StorageError::corrupt(path, offset as u64, reason))?;
                records.push((offset as u64, record));
                offset = next;
            }
            Err(_) if is_last && bytes[offset..].iter().all(|&b| b == 0) => {
                // The zeroes preallocated after the last record (or a write of which no byte
                // reached the disk): the end of the log. Only the active segment has them.
                return Ok(ScannedSegment {
                    records,
                    valid_bytes: offset as u64,
                    torn: None,
                });
            }
            Err(frame_error) => {
                let torn = classify_damage(path, bytes, offset, &frame_error, is_last)?;
                return Ok(ScannedSegment {
                    records,
                    valid_bytes: offset as u64,
                    torn: Some(torn),
                });
            }
        }
    }
    Ok(ScannedSegment {
        records,
        valid_bytes: offset as u64,
        torn: None,
    })
}

/// Decides whether damage at `offset` is a torn write (returns its
/// description) or corruption (returns the error).
fn classify_damage(
    path: &Path,
    bytes: &[u8],
    offset: usize,
    frame_error: &FrameError,
    is_last: bool,
) -> Result<String, StorageError> {
    let what = frame_error.describe();
    if !is_last {
        return Err(StorageError::corrupt(
            path,
            offset as u64,
            format!("{what} in a segment that is not the last one"),
        ));
    }
    match find_intact_record_after(bytes, offset + 1) {
        TailSearch::Found(later) => Err(StorageError::corrupt(
            path,
            offset as u64,
            format!(
                "{what}, but an intact record follows at offset {later}, so this is \
                 not a torn write at the tail"
            ),
        )),
        TailSearch::BudgetExhausted => Err(StorageError::corrupt(
            path,
            offset as u64,
            format!("{what}, and the bytes after it are too many to prove it is a torn tail"),
        )),
        TailSearch::NoneFound => Ok(what),
    }
}

enum TailSearch {
    Found(usize),
    NoneFound,
    BudgetExhausted,
}

/// Looks at every offset from `from` on for an intact record whose contents
/// also decode: if one exists, the damage before it is not a torn tail.
fn find_intact_record_after(bytes: &[u8], from: usize) -> TailSearch {
    let mut budget_bytes = TAIL_SEARCH_BUDGET_BYTES;
    let mut offset = from;
    while offset + HEADER_BYTES < bytes.len() {
        let body_len = u32::from_le_bytes(bytes[offset..offset + 4].try_into().expect("4 bytes"));
        let fits = body_len as usize <= bytes.len() - offset - HEADER_BYTES;
        if body_len != 0 && fits {
            if budget_bytes < u64::from(body_len) {
                return TailSearch::BudgetExhausted;
            }
            budget_bytes -= u64::from(body_len);
            if let Ok((body, _)) = record::frame_at(bytes, offset) {
                if record::decode_body(body).is_ok() {
                    return TailSearch::Found(offset);
                }
            }
        }
        offset += 1;
    }
    TailSearch::NoneFound
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::Entry;

    #[test]
    fn names_round_trip_and_sort() {
        assert_eq!(segment_file_name(7), "wal-00000000000000000007.log");
        assert_eq!(parse_segment_file_name(&segment_file_name(7)), Some(7));
        assert_eq!(parse_segment_file_name("wal-7.log"), None);
        assert_eq!(
            parse_segment_file_name("wal-0000000000000000000x.log"),
            None
        );
        assert!(segment_file_name(9) < segment_file_name(10));
    }

    fn two_records() -> (Vec<u8>, usize) {
        let mut buf = Vec::new();
        let entry = |index| Entry {
            kind: Default::default(),
            index,
            term: 1,
            data: vec![index as u8; 10],
        };
        record::encode_entries(&mut buf, &[entry(1)]);
        let second = buf.len();
        record::encode_entries(&mut buf, &[entry(2)]);
        (buf, second)
    }

    #[test]
    fn damage_in_the_last_record_is_a_torn_tail() {
        let (mut buf, second) = two_records();
        buf[second + 12] ^= 1;
        let scanned = scan_segment(Path::new("seg"), &buf, true).expect("torn tail");
        assert_eq!(scanned.valid_bytes, second as u64);
        assert_eq!(scanned.records.len(), 1);
        assert!(scanned.torn.is_some());
    }

    #[test]
    fn preallocated_zeroes_end_only_the_last_segment() {
        let (mut buf, _) = two_records();
        let records_bytes = buf.len();
        buf.resize(records_bytes + 4096, 0);
        let scanned = scan_segment(Path::new("seg"), &buf, true).expect("zero tail");
        assert_eq!(scanned.valid_bytes, records_bytes as u64);
        assert_eq!(scanned.records.len(), 2);
        assert!(
            scanned.torn.is_none(),
            "zeroes reported as {:?}",
            scanned.torn
        );
        let error = scan_segment(Path::new("seg"), &buf, false)
            .err()
            .expect("zeroes after a closed segment");
        assert!(error.to_string().contains("not the last"), "{error}");
    }

    #[test]
    fn damage_before_an_intact_record_is_corruption() {
        let (mut buf, _) = two_records();
        buf[12] ^= 1;
        let error = scan_segment(Path::new("seg"), &buf, true)
            .err()
            .expect("corrupt");
        assert!(error.to_string().contains("at offset 0"), "{error}");
        let error = scan_segment(Path::new("seg"), &buf[..20], false)
            .err()
            .expect("short non-last segment");
        assert!(error.to_string().contains("not the last"), "{error}");
    }
}
