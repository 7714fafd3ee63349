//! The split report written beside every image table: images and patients per split and
//! class, and the check that no patient (or lesion) appears in two splits.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::table::Split;

/// Images, distinct patients, and images per label name, of one split.
type PerSplit = (u64, BTreeSet<String>, BTreeMap<String, u64>);

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitCounts {
    pub images: u64,
    pub patients: u64,
    /// Images per class name (multi-label: images carrying each label).
    pub classes: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitReport {
    pub splits: BTreeMap<String, SplitCounts>,
    pub total_images: u64,
    pub total_patients: u64,
    pub rejected: u64,
}

/// Accumulates a report row by row and checks patient-disjointness.
#[derive(Debug, Default)]
pub struct SplitTally {
    label_names: Vec<String>,
    patients: BTreeMap<String, Split>,
    per_split: BTreeMap<Split, PerSplit>,
    pub rejected: u64,
}

impl SplitTally {
    pub fn new(label_names: &[String]) -> Self {
        Self { label_names: label_names.to_vec(), ..Default::default() }
    }

    /// Count an image; `Err` names the patient if it already appeared in another split.
    pub fn add(
        &mut self,
        patient: &str,
        split: Split,
        label: Option<i32>,
        labels: Option<&[u8]>,
    ) -> Result<(), String> {
        match self.patients.get(patient) {
            Some(s) if *s != split => {
                return Err(format!("patient `{patient}` is in both {} and {}", s.as_str(), split.as_str()));
            }
            Some(_) => {}
            None => {
                self.patients.insert(patient.to_string(), split);
            }
        }
        let e = self.per_split.entry(split).or_default();
        e.0 += 1;
        e.1.insert(patient.to_string());
        let mut bump = |i: usize| {
            let name = self.label_names.get(i).cloned().unwrap_or_else(|| format!("#{i}"));
            *e.2.entry(name).or_default() += 1;
        };
        if let Some(l) = label {
            bump(l.max(0) as usize);
        }
        if let Some(ls) = labels {
            ls.iter().enumerate().filter(|(_, v)| **v != 0).for_each(|(i, _)| bump(i));
        }
        Ok(())
    }

    pub fn report(&self) -> SplitReport {
        let splits: BTreeMap<String, SplitCounts> = self
            .per_split
            .iter()
            .map(|(s, (n, p, c))| {
                (s.as_str().to_string(), SplitCounts { images: *n, patients: p.len() as u64, classes: c.clone() })
            })
            .collect();
        SplitReport {
            total_images: splits.values().map(|s| s.images).sum(),
            total_patients: self.patients.len() as u64,
            splits,
            rejected: self.rejected,
        }
    }
}

impl SplitReport {
    /// A table for the terminal: one row per split, one column per class.
    pub fn table(&self, label_names: &[String]) -> String {
        let mut out = String::new();
        let w = label_names.iter().map(|n| n.len()).max().unwrap_or(5).max(6);
        let _ = write!(out, "{:6} {:>8} {:>8}", "split", "images", "patients");
        for n in label_names {
            let _ = write!(out, " {n:>w$}");
        }
        out.push('\n');
        for s in Split::ALL {
            let Some(c) = self.splits.get(s.as_str()) else { continue };
            let _ = write!(out, "{:6} {:>8} {:>8}", s.as_str(), c.images, c.patients);
            for n in label_names {
                let _ = write!(out, " {:>w$}", c.classes.get(n).copied().unwrap_or(0));
            }
            out.push('\n');
        }
        let _ = write!(
            out,
            "total {} images, {} patients, {} rejected",
            self.total_images, self.total_patients, self.rejected
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_patient_in_two_splits_is_an_error() {
        let names = vec!["a".to_string(), "b".to_string()];
        let mut t = SplitTally::new(&names);
        t.add("p1", Split::Train, Some(0), None).expect("ok");
        t.add("p1", Split::Train, Some(1), None).expect("same split ok");
        t.add("p2", Split::Test, Some(1), None).expect("ok");
        let e = t.add("p1", Split::Test, Some(0), None).expect_err("crosses");
        assert_eq!(e, "patient `p1` is in both train and test");
        let r = t.report();
        assert_eq!((r.total_images, r.total_patients), (3, 2));
        assert_eq!(r.splits["train"].classes["b"], 1);
        let table = r.table(&names);
        assert!(table.contains("train         2        1"), "{table}");
    }
}
