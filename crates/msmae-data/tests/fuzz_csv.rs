//! Property-based fuzzing of the metadata CSV reader (`TextTable::read_csv`, what every
//! label file and CSV manifest goes through) on stable Rust with a fixed budget: headers
//! with and without a UTF-8 byte-order mark, ragged rows (short and long), quoted fields
//! holding separators, doubled quotes and line breaks, unterminated quotes, CRLF line ends,
//! empty lines and invalid UTF-8. The reader must never panic; a table it returns is
//! rectangular with a clean header; an error names the file.

use std::io::Write;

use msmae_data::meta::TextTable;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

#[derive(Debug, Clone)]
enum Cell {
    Plain(String),
    Quoted(String),
    Empty,
    /// Bytes that are not UTF-8 (Latin-1 `é`, a lone continuation byte, a cut sequence).
    Invalid(Vec<u8>),
    /// An opening quote that is never closed.
    Unterminated(String),
}

fn cell() -> impl Strategy<Value = Cell> {
    prop_oneof![
        6 => "[A-Za-z0-9_ .|-]{0,12}".prop_map(Cell::Plain),
        2 => "[A-Za-z0-9 ,\"\n\r|]{0,12}".prop_map(Cell::Quoted),
        1 => Just(Cell::Empty),
        1 => prop::sample::select(vec![vec![0xe9u8], vec![0x80], vec![0xe2, 0x82], vec![0xff, 0xfe]]).prop_map(Cell::Invalid),
        1 => "[A-Za-z ,]{0,8}".prop_map(Cell::Unterminated),
    ]
}

fn render(c: &Cell, out: &mut Vec<u8>) {
    match c {
        Cell::Plain(s) => out.extend_from_slice(s.as_bytes()),
        Cell::Quoted(s) => {
            out.push(b'"');
            out.extend_from_slice(s.replace('"', "\"\"").as_bytes());
            out.push(b'"');
        }
        Cell::Empty => {}
        Cell::Invalid(b) => out.extend_from_slice(b),
        Cell::Unterminated(s) => {
            out.push(b'"');
            out.extend_from_slice(s.as_bytes());
        }
    }
}

#[derive(Debug, Clone)]
struct CsvCase {
    bom: bool,
    crlf: bool,
    header: Vec<String>,
    rows: Vec<Vec<Cell>>,
    trailing_newline: bool,
}

fn csv_case() -> impl Strategy<Value = CsvCase> {
    (
        any::<bool>(),
        any::<bool>(),
        prop::collection::vec("[A-Za-z][A-Za-z0-9 _]{0,10}", 1..6),
        // Rows of 0–7 cells whatever the header's width: ragged both ways.
        prop::collection::vec(prop::collection::vec(cell(), 0..8), 0..12),
        any::<bool>(),
    )
        .prop_map(|(bom, crlf, header, rows, trailing_newline)| CsvCase {
            bom,
            crlf,
            header,
            rows,
            trailing_newline,
        })
}

fn bytes_of(c: &CsvCase) -> Vec<u8> {
    let eol: &[u8] = if c.crlf { b"\r\n" } else { b"\n" };
    let mut out = Vec::new();
    if c.bom {
        out.extend_from_slice("\u{feff}".as_bytes());
    }
    out.extend_from_slice(c.header.join(",").as_bytes());
    for row in &c.rows {
        out.extend_from_slice(eol);
        for (i, cell) in row.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            render(cell, &mut out);
        }
    }
    if c.trailing_newline {
        out.extend_from_slice(eol);
    }
    out
}

#[test]
fn the_csv_reader_never_panics_and_returns_rectangular_tables() {
    let cases = 1500;
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("labels.csv");
    let counts = std::cell::RefCell::new((0u32, 0u32));
    TestRunner::new(Config { cases, failure_persistence: None, ..Config::default() })
        .run(&csv_case(), |c| {
            let bytes = bytes_of(&c);
            std::fs::File::create(&path).and_then(|mut f| f.write_all(&bytes)).expect("write the case");
            let got = std::panic::catch_unwind(|| TextTable::read_csv(&path, b','));
            let Ok(got) = got else {
                return Err(TestCaseError::fail(format!("read_csv panicked on {:?}", String::from_utf8_lossy(&bytes))));
            };
            match got {
                Ok(t) => {
                    counts.borrow_mut().0 += 1;
                    prop_assert!(!t.names().is_empty());
                    // The byte-order mark never leaks into a column name.
                    prop_assert!(t.names().iter().all(|n| !n.starts_with('\u{feff}')), "names {:?}", t.names());
                    if c.header.iter().all(|h| !h.trim().is_empty()) && !c.bom {
                        prop_assert_eq!(&t.names()[0], c.header[0].trim());
                    }
                    // Every column has every row, and every row can be named for an error.
                    for n in t.names() {
                        let col = t.column(n, "text").map_err(|e| TestCaseError::fail(e.to_string()))?;
                        for r in 0..t.len() {
                            let _ = col.get(r);
                        }
                        if !t.is_empty() {
                            let e = col.error(t.len() - 1, "bad value").to_string();
                            prop_assert!(e.contains("labels.csv") && e.contains("line "), "{}", e);
                        }
                    }
                    // Quotes may pair up otherwise than generated (an unterminated one), but
                    // a row never comes from nothing: at most one per physical line.
                    let lines = bytes.split(|&b| b == b'\n').count();
                    prop_assert!(t.len() < lines.max(1), "{} rows from {} lines", t.len(), lines);
                }
                Err(e) => {
                    counts.borrow_mut().1 += 1;
                    let m = e.to_string();
                    prop_assert!(m.contains("labels.csv"), "the error names the file: {}", m);
                }
            }
            Ok(())
        })
        .unwrap_or_else(|e| panic!("csv reader: {e}"));
    let (read, refused) = *counts.borrow();
    assert!(read > 0, "no case read at all: the generator produces only broken files");
    eprintln!(
        "fuzz: metadata CSV reader, {cases} generated files: {read} read as tables, {refused} refused with an error naming the file, 0 panics"
    );
}
