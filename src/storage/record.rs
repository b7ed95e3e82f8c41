//! The WAL's record format. A segment file is a sequence of records
//!
//! ```text
//! [body_len u32][crc32 u32][kind u8][payload ...]    (little-endian)
//! ```
//!
//! where `body_len` counts the kind byte and the payload, and the CRC-32
//! (crc32fast) covers the same bytes. Three kinds exist:
//!
//! - `HardState`: term, vote, commit (24 bytes). The latest one wins.
//! - `Entries`: a run of contiguous entries, each `[index u64][term u64]
//!   [data_len u32][data]`, after a `count u32`. The top bit of `data_len`
//!   marks a conf-change entry (its data is a cluster configuration): data
//!   is far below 2^31 bytes, and records written before membership was
//!   replicated have the bit clear, so they read as they always did. A run starting at index `i`
//!   replaces every stored entry at `>= i`: that is how overwrites are logged.
//! - `Reset`: index, term of a snapshot that did *not* match the stored log
//!   (one installed from the leader): every entry logged before it is void,
//!   and the next entry is `index + 1`.
//!
//! Encoding appends to a caller's buffer, so a whole batch becomes one
//! `write`. Decoding checks the frame (length, checksum) separately from the
//! contents: a bad frame at the tail of the log may be a torn write, but a
//! frame whose checksum holds and whose contents make no sense is corruption.

use crate::raft::{Entry, EntryKind, HardState, SnapshotMeta};

/// The bit of an entry's `data_len` that marks a conf-change entry.
const CONF_CHANGE_BIT: u32 = 1 << 31;

/// Bytes before the body: `body_len` and `crc32`.
pub(crate) const HEADER_BYTES: usize = 8;

/// The largest body (kind + payload) of one record. Larger batches are split
/// into several records; a single larger entry is refused. The bound keeps a
/// corrupted length field from making recovery allocate or scan gigabytes.
pub(crate) const MAX_BODY_BYTES: usize = 64 << 20;

/// Per-entry bytes in an `Entries` payload besides the data.
const ENTRY_OVERHEAD_BYTES: usize = 8 + 8 + 4;
/// Bytes of an `Entries` payload before the first entry (the count).
const ENTRIES_PREFIX_BYTES: usize = 4;

/// The largest `data` one entry may carry so that its record fits.
pub(crate) const MAX_ENTRY_DATA_BYTES: usize =
    MAX_BODY_BYTES - 1 - ENTRIES_PREFIX_BYTES - ENTRY_OVERHEAD_BYTES;

const KIND_HARD_STATE: u8 = 1;
const KIND_ENTRIES: u8 = 2;
const KIND_RESET: u8 = 3;

const HARD_STATE_PAYLOAD_BYTES: usize = 24;
const RESET_PAYLOAD_BYTES: usize = 16;

/// One decoded WAL record.
#[derive(Debug)]
pub(crate) enum Record {
    HardState(HardState),
    /// Non-empty, contiguous, terms non-decreasing (checked when decoded).
    Entries(Vec<Entry>),
    Reset(SnapshotMeta),
}

/// The exact encoded size of `encode_hard_state`.
pub(crate) const HARD_STATE_RECORD_BYTES: usize = HEADER_BYTES + 1 + HARD_STATE_PAYLOAD_BYTES;

pub(crate) fn encode_hard_state(buf: &mut Vec<u8>, hard_state: &HardState) {
    let start = begin(buf, KIND_HARD_STATE);
    buf.extend_from_slice(&hard_state.term.to_le_bytes());
    buf.extend_from_slice(&hard_state.vote.to_le_bytes());
    buf.extend_from_slice(&hard_state.commit.to_le_bytes());
    finish(buf, start);
    assert_eq!(buf.len() - start, HARD_STATE_RECORD_BYTES);
}

pub(crate) fn encode_reset(buf: &mut Vec<u8>, meta: &SnapshotMeta) {
    let start = begin(buf, KIND_RESET);
    buf.extend_from_slice(&meta.index.to_le_bytes());
    buf.extend_from_slice(&meta.term.to_le_bytes());
    finish(buf, start);
}

/// Encodes `entries` as as few `Entries` records as fit under
/// `MAX_BODY_BYTES`. The caller has checked that every entry fits alone.
pub(crate) fn encode_entries(buf: &mut Vec<u8>, entries: &[Entry]) {
    let mut rest = entries;
    while !rest.is_empty() {
        let mut body_bytes = 1 + ENTRIES_PREFIX_BYTES;
        let mut count = 0;
        for entry in rest {
            let entry_bytes = ENTRY_OVERHEAD_BYTES + entry.data.len();
            if count > 0 && body_bytes + entry_bytes > MAX_BODY_BYTES {
                break;
            }
            body_bytes += entry_bytes;
            count += 1;
        }
        assert!(body_bytes <= MAX_BODY_BYTES, "entry too large for a record");
        let (run, tail) = rest.split_at(count);
        let start = begin(buf, KIND_ENTRIES);
        buf.extend_from_slice(&(count as u32).to_le_bytes());
        for entry in run {
            buf.extend_from_slice(&entry.index.to_le_bytes());
            buf.extend_from_slice(&entry.term.to_le_bytes());
            let mut data_len = entry.data.len() as u32;
            assert!(
                data_len < CONF_CHANGE_BIT,
                "entry data too large for its record"
            );
            if entry.kind == EntryKind::ConfChange {
                data_len |= CONF_CHANGE_BIT;
            }
            buf.extend_from_slice(&data_len.to_le_bytes());
            buf.extend_from_slice(&entry.data);
        }
        finish(buf, start);
        // Check what we wrote: the body is exactly the size we planned.
        assert_eq!(buf.len() - start, HEADER_BYTES + body_bytes);
        rest = tail;
    }
}

/// Reserves the header and writes the kind; returns where the record starts.
fn begin(buf: &mut Vec<u8>, kind: u8) -> usize {
    let start = buf.len();
    buf.extend_from_slice(&[0u8; HEADER_BYTES]);
    buf.push(kind);
    start
}

/// Fills in the length and checksum of the record that starts at `start`.
fn finish(buf: &mut [u8], start: usize) {
    let body = &buf[start + HEADER_BYTES..];
    assert!(!body.is_empty() && body.len() <= MAX_BODY_BYTES);
    let body_len = body.len() as u32;
    let crc = crc32fast::hash(body);
    buf[start..start + 4].copy_from_slice(&body_len.to_le_bytes());
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Why the bytes at an offset are not a whole, intact record.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum FrameError {
    /// The file ends inside the header or the body.
    Short,
    /// The length field is 0 or above `MAX_BODY_BYTES`.
    BadLength(u32),
    /// The body is complete but its checksum does not match.
    BadChecksum,
}

impl FrameError {
    pub(crate) fn describe(&self) -> String {
        match self {
            FrameError::Short => "the file ends inside a record".to_string(),
            FrameError::BadLength(len) => format!("impossible record length {len}"),
            FrameError::BadChecksum => "record checksum mismatch".to_string(),
        }
    }
}

/// Checks the frame at `offset`; on success returns the body (kind +
/// payload) and the offset of the next record.
pub(crate) fn frame_at(bytes: &[u8], offset: usize) -> Result<(&[u8], usize), FrameError> {
    let rest = &bytes[offset..];
    if rest.len() < HEADER_BYTES {
        return Err(FrameError::Short);
    }
    let body_len = u32::from_le_bytes(rest[0..4].try_into().expect("4 bytes"));
    if body_len == 0 || body_len as usize > MAX_BODY_BYTES {
        return Err(FrameError::BadLength(body_len));
    }
    let end = HEADER_BYTES + body_len as usize;
    if rest.len() < end {
        return Err(FrameError::Short);
    }
    let crc = u32::from_le_bytes(rest[4..8].try_into().expect("4 bytes"));
    let body = &rest[HEADER_BYTES..end];
    if crc32fast::hash(body) != crc {
        return Err(FrameError::BadChecksum);
    }
    Ok((body, offset + end))
}

/// Decodes a body whose frame is intact. An error here is never a torn
/// write: the checksum matched, so these bytes are what was written.
pub(crate) fn decode_body(body: &[u8]) -> Result<Record, String> {
    let (kind, payload) = body.split_first().ok_or("empty record body")?;
    let mut reader = Reader { bytes: payload };
    let record = match *kind {
        KIND_HARD_STATE => {
            expect_len(payload, HARD_STATE_PAYLOAD_BYTES, "hard state")?;
            Record::HardState(HardState {
                term: reader.u64()?,
                vote: reader.u64()?,
                commit: reader.u64()?,
            })
        }
        KIND_RESET => {
            expect_len(payload, RESET_PAYLOAD_BYTES, "reset")?;
            Record::Reset(SnapshotMeta {
                index: reader.u64()?,
                term: reader.u64()?,
            })
        }
        KIND_ENTRIES => Record::Entries(decode_entries(&mut reader)?),
        other => return Err(format!("unknown record kind {other}")),
    };
    if !reader.bytes.is_empty() {
        return Err(format!(
            "{} unexpected bytes after the record's payload",
            reader.bytes.len()
        ));
    }
    Ok(record)
}

fn expect_len(payload: &[u8], expected: usize, what: &str) -> Result<(), String> {
    if payload.len() == expected {
        Ok(())
    } else {
        Err(format!(
            "{what} record has {} payload bytes, expected {expected}",
            payload.len()
        ))
    }
}

fn decode_entries(reader: &mut Reader<'_>) -> Result<Vec<Entry>, String> {
    let count = reader.u32()? as usize;
    if count == 0 {
        return Err("entries record with no entries".to_string());
    }
    // Every entry takes at least ENTRY_OVERHEAD_BYTES, so a count larger than
    // that allows is corrupt; checking first bounds the allocation.
    if count > reader.bytes.len() / ENTRY_OVERHEAD_BYTES {
        return Err(format!("entries record claims {count} entries"));
    }
    let mut entries: Vec<Entry> = Vec::with_capacity(count);
    for _ in 0..count {
        let index = reader.u64()?;
        let term = reader.u64()?;
        let data_len_field = reader.u32()?;
        let kind = if data_len_field & CONF_CHANGE_BIT != 0 {
            EntryKind::ConfChange
        } else {
            EntryKind::Normal
        };
        let data_len = (data_len_field & !CONF_CHANGE_BIT) as usize;
        let data = reader.take(data_len)?.to_vec();
        // Check what we read back: a run is contiguous with non-decreasing terms.
        if let Some(previous) = entries.last() {
            if index != previous.index + 1 {
                return Err(format!(
                    "entry {index} follows entry {} in one record",
                    previous.index
                ));
            }
            if term < previous.term {
                return Err(format!(
                    "entry {index} has term {term}, below the term {} of the entry before it",
                    previous.term
                ));
            }
        } else if index == 0 {
            return Err("entry with index 0".to_string());
        }
        let entry = Entry {
            term,
            index,
            kind,
            data,
        };
        if kind == EntryKind::ConfChange && entry.membership().is_none() {
            return Err(format!("conf-change entry {index} does not decode"));
        }
        entries.push(entry);
    }
    Ok(entries)
}

/// A cursor over a payload that reports, rather than panics on, a short read.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, len: usize) -> Result<&'a [u8], String> {
        if self.bytes.len() < len {
            return Err(format!(
                "record payload ends early: wanted {len} more bytes, {} left",
                self.bytes.len()
            ));
        }
        let (head, tail) = self.bytes.split_at(len);
        self.bytes = tail;
        Ok(head)
    }

    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64, data: &[u8]) -> Entry {
        Entry {
            kind: Default::default(),
            index,
            term,
            data: data.to_vec(),
        }
    }

    #[test]
    fn records_round_trip() {
        let hard_state = HardState {
            term: 3,
            vote: 2,
            commit: 7,
        };
        let entries = vec![entry(5, 2, b"a"), entry(6, 3, b""), entry(7, 3, b"xyz")];
        let meta = SnapshotMeta { index: 9, term: 4 };
        let mut buf = Vec::new();
        encode_hard_state(&mut buf, &hard_state);
        assert_eq!(buf.len(), HARD_STATE_RECORD_BYTES);
        encode_entries(&mut buf, &entries);
        encode_reset(&mut buf, &meta);

        let mut offset = 0;
        let mut records = Vec::new();
        while offset < buf.len() {
            let (body, next) = frame_at(&buf, offset).expect("intact frame");
            records.push(decode_body(body).expect("valid body"));
            offset = next;
        }
        assert!(matches!(&records[0], Record::HardState(h) if *h == hard_state));
        assert!(matches!(&records[1], Record::Entries(e) if *e == entries));
        assert!(matches!(&records[2], Record::Reset(m) if *m == meta));
    }

    #[test]
    fn damaged_frames_are_reported() {
        let mut buf = Vec::new();
        encode_entries(&mut buf, &[entry(1, 1, b"hello")]);
        assert_eq!(frame_at(&buf[..buf.len() - 1], 0), Err(FrameError::Short));
        assert_eq!(frame_at(&buf[..3], 0), Err(FrameError::Short));
        let mut flipped = buf.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 0x40;
        assert_eq!(frame_at(&flipped, 0), Err(FrameError::BadChecksum));
        let zeros = vec![0u8; 32];
        assert_eq!(frame_at(&zeros, 0), Err(FrameError::BadLength(0)));
    }

    #[test]
    fn intact_frame_with_bad_contents_is_rejected() {
        // A run whose indexes jump is refused even though its checksum holds.
        let mut buf = Vec::new();
        let start = begin(&mut buf, KIND_ENTRIES);
        buf.extend_from_slice(&2u32.to_le_bytes());
        for index in [4u64, 6] {
            buf.extend_from_slice(&index.to_le_bytes());
            buf.extend_from_slice(&1u64.to_le_bytes());
            buf.extend_from_slice(&0u32.to_le_bytes());
        }
        finish(&mut buf, start);
        let (body, _) = frame_at(&buf, 0).expect("intact frame");
        let error = decode_body(body).expect_err("gap inside a run");
        assert!(error.contains("entry 6 follows entry 4"), "{error}");
    }
}
