//! TensorBoard scalar event files, written by the training loop into a run-log directory
//! outside the artifact (so they never change a cache digest).
//!
//! The format is TensorFlow's: a file `events.out.tfevents.<seconds>.<host>` of TFRecords
//! (length, masked CRC-32C of the length, an `Event` protocol buffer, masked CRC-32C of
//! it), the first holding `file_version: "brain.Event:2"`, each other a `Summary` of
//! `simple_value` scalars. The few protobuf fields are encoded here directly: a protobuf
//! crate and generated code would be far more than these 30 lines of wire format.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// An open event file.
#[derive(Debug)]
pub struct EventWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl EventWriter {
    /// Create `dir` and a new event file in it (a resumed run adds a file; TensorBoard
    /// merges the files of a directory).
    pub fn create(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "localhost".into());
        let path = dir.join(format!("events.out.tfevents.{}.{host}.{}", now.as_secs(), std::process::id()));
        let mut w = Self { out: BufWriter::new(File::create(&path)?), path };
        let mut ev = Vec::new();
        field_double(&mut ev, 1, wall_time());
        field_bytes(&mut ev, 3, b"brain.Event:2");
        w.record(&ev)?;
        w.out.flush()?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Scalars `(tag, value)` at `step`; non-finite values are written as they are
    /// (TensorBoard shows NaN), and flushed so that a live TensorBoard sees each epoch.
    pub fn scalars(&mut self, step: i64, values: &[(&str, f64)]) -> std::io::Result<()> {
        let mut summary = Vec::new();
        for (tag, v) in values {
            let mut value = Vec::new();
            field_bytes(&mut value, 1, tag.as_bytes());
            key(&mut value, 2, 5);
            value.extend_from_slice(&(*v as f32).to_le_bytes());
            field_bytes(&mut summary, 1, &value);
        }
        let mut ev = Vec::new();
        field_double(&mut ev, 1, wall_time());
        key(&mut ev, 2, 0);
        varint(&mut ev, step as u64);
        field_bytes(&mut ev, 5, &summary);
        self.record(&ev)?;
        self.out.flush()
    }

    fn record(&mut self, data: &[u8]) -> std::io::Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        self.out.write_all(&len)?;
        self.out.write_all(&masked_crc(&len).to_le_bytes())?;
        self.out.write_all(data)?;
        self.out.write_all(&masked_crc(data).to_le_bytes())
    }
}

fn wall_time() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// TFRecord's checksum: CRC-32C, rotated right by 15 and offset.
fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c::crc32c(data);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn key(out: &mut Vec<u8>, field: u32, wire: u32) {
    varint(out, u64::from(field << 3 | wire));
}

fn field_double(out: &mut Vec<u8>, field: u32, v: f64) {
    key(out, field, 1);
    out.extend_from_slice(&v.to_le_bytes());
}

fn field_bytes(out: &mut Vec<u8>, field: u32, b: &[u8]) {
    key(out, field, 2);
    varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_and_checksums_follow_the_wire_format() {
        let mut v = Vec::new();
        varint(&mut v, 300);
        assert_eq!(v, [0xac, 0x02]);
        // CRC-32C check value of "123456789" (RFC 3720), then TFRecord's mask.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(masked_crc(b"123456789"), 0xe306_9283u32.rotate_right(15).wrapping_add(0xa282_ead8));
    }

    #[test]
    fn records_frame_their_length_and_data() {
        let d = tempfile::tempdir().expect("tmp");
        let mut w = EventWriter::create(d.path()).expect("create");
        w.scalars(3, &[("train/loss", 0.5)]).expect("write");
        let bytes = std::fs::read(w.path()).expect("read");
        // Two records: walk them by their lengths and check each checksum.
        let mut at = 0;
        let mut n = 0;
        while at < bytes.len() {
            let len = u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8")) as usize;
            assert_eq!(masked_crc(&bytes[at..at + 8]).to_le_bytes(), bytes[at + 8..at + 12]);
            let data = &bytes[at + 12..at + 12 + len];
            assert_eq!(masked_crc(data).to_le_bytes(), bytes[at + 12 + len..at + 16 + len]);
            at += 16 + len;
            n += 1;
        }
        assert_eq!(n, 2);
        assert!(w.path().file_name().is_some_and(|f| f.to_string_lossy().starts_with("events.out.tfevents.")));
    }
}
