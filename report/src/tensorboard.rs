//! TensorBoard event files: scalars that stock TensorBoard (and its Python event reader) read.
//!
//! An event file is a TFRecord stream: each record is `u64 length (LE)`, the masked CRC-32C of
//! those 8 bytes, the payload, and the payload's masked CRC-32C. Each payload is a serialized
//! `tensorflow.Event` protobuf; the first one names the format (`file_version =
//! "brain.Event:2"`), every later one carries a `Summary` of one `simple_value`. The few
//! protobuf fields needed are encoded here by hand rather than pulling a protobuf toolchain in.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};

/// Appends scalars to one event file in a directory (TensorBoard's "run").
pub struct EventWriter {
    file: File,
    path: PathBuf,
}

impl EventWriter {
    /// Creates `dir` if needed and a new event file in it, named as TensorFlow names them
    /// (`events.out.tfevents.<unix time>.<host>.<pid>`), so that a restarted process adds a
    /// file next to the earlier ones instead of overwriting them.
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create the TensorBoard folder", dir.display()))?;
        let now = unix_seconds();
        let host = std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_string()).unwrap_or_default();
        let host = if host.is_empty() { "localhost".to_string() } else { host };
        let pid = std::process::id();
        let mut n = 0u32;
        // Two writers started in the same second (site and coordinator sharing a folder) each
        // get their own file.
        let (file, path) = loop {
            let suffix = if n == 0 { String::new() } else { format!(".{n}") };
            let path = dir.join(format!("events.out.tfevents.{}.{host}.{pid}{suffix}", now as u64));
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(file) => break (file, path),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 1000 => n += 1,
                Err(e) => return Err(e).with_context(|| format!("{}: cannot create", path.display())),
            }
        };
        let mut writer = EventWriter { file, path };
        writer.write_event(&event_file_version(now))?;
        writer.flush()?;
        Ok(writer)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Adds `value` of `tag` at `step`, stamped now.
    pub fn add_scalar(&mut self, tag: &str, value: f64, step: i64) -> Result<()> {
        self.write_event(&event_scalar(unix_seconds(), step, tag, value as f32))
    }

    /// Makes what was added readable by a TensorBoard watching the folder.
    pub fn flush(&mut self) -> Result<()> {
        self.file.flush().with_context(|| format!("{}: cannot write", self.path.display()))
    }

    fn write_event(&mut self, event: &[u8]) -> Result<()> {
        self.file.write_all(&record(event)).with_context(|| format!("{}: cannot write", self.path.display()))
    }
}

fn unix_seconds() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// One TFRecord: length, its masked CRC, the data, its masked CRC.
fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    out
}

/// TFRecord's CRC mask: rotate right by 15 and add a constant (a CRC of data holding CRCs
/// would otherwise be weak).
fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), bitwise: event files are small.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= byte as u32;
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0x82f6_3b78 } else { crc >> 1 };
        }
    }
    !crc
}

// Protobuf wire format: a field's key is (number << 3) | wire type; 1 = 64-bit, 0 = varint,
// 2 = length-delimited, 5 = 32-bit.

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn length_delimited(field: u32, bytes: &[u8], out: &mut Vec<u8>) {
    varint(((field << 3) | 2) as u64, out);
    varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

/// `Event { wall_time = 1 (double), step = 2 (int64) }` and the rest.
fn event_header(wall_time: f64, step: i64) -> Vec<u8> {
    let mut out = vec![(1 << 3) | 1];
    out.extend_from_slice(&wall_time.to_le_bytes());
    if step != 0 {
        out.push(2 << 3);
        varint(step as u64, &mut out);
    }
    out
}

/// The first event of a file: `file_version = 3`.
fn event_file_version(wall_time: f64) -> Vec<u8> {
    let mut out = event_header(wall_time, 0);
    length_delimited(3, b"brain.Event:2", &mut out);
    out
}

/// `Event { summary = 5: Summary { value = 1: Value { tag = 1, simple_value = 2 (float) } } }`.
fn event_scalar(wall_time: f64, step: i64, tag: &str, value: f32) -> Vec<u8> {
    let mut value_msg = Vec::new();
    length_delimited(1, tag.as_bytes(), &mut value_msg);
    value_msg.push((2 << 3) | 5);
    value_msg.extend_from_slice(&value.to_le_bytes());
    let mut summary = Vec::new();
    length_delimited(1, &value_msg, &mut summary);
    let mut out = event_header(wall_time, step);
    length_delimited(5, &summary, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CRC-32C check value of "123456789" (RFC 3720 §B.4) and an empty input.
    #[test]
    fn crc32c_matches_the_standard_check_values() {
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn varints_are_little_endian_base_128() {
        let mut out = Vec::new();
        varint(300, &mut out);
        assert_eq!(out, [0xac, 0x02]);
        // A negative step is a ten-byte two's complement varint, as protobuf's int64.
        let mut out = Vec::new();
        varint(-1i64 as u64, &mut out);
        assert_eq!(out.len(), 10);
    }

    /// Records hold what they frame: the length, then the data, each with its masked CRC.
    #[test]
    fn a_record_frames_its_data() {
        let data = b"abc";
        let r = record(data);
        assert_eq!(u64::from_le_bytes(r[..8].try_into().unwrap()), 3);
        assert_eq!(&r[12..15], data);
        assert_eq!(u32::from_le_bytes(r[15..19].try_into().unwrap()), masked_crc32c(data));
    }

    #[test]
    fn a_restarted_writer_adds_a_file_beside_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = EventWriter::create(dir.path()).unwrap();
        let b = EventWriter::create(dir.path()).unwrap();
        assert_ne!(a.path(), b.path());
        a.add_scalar("loss", 0.5, 1).unwrap();
        a.flush().unwrap();
        assert!(std::fs::metadata(a.path()).unwrap().len() > std::fs::metadata(b.path()).unwrap().len());
    }
}
