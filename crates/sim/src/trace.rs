//! The event trace: a bounded tail for failure reports and a running hash
//! of every line, so two runs of one seed can be compared cheaply.

use std::collections::VecDeque;

/// Lines kept for a failure report.
pub const TAIL_LINES_MAX: usize = 50;
/// Notable lines (not message deliveries) kept for a failure report.
pub const NOTABLE_LINES_MAX: usize = 30;

pub struct Trace {
    tail: VecDeque<String>,
    notable: VecDeque<String>,
    hash: u64,
    lines: u64,
    full: Option<Vec<String>>,
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

impl Trace {
    pub fn new() -> Trace {
        Trace {
            tail: VecDeque::with_capacity(TAIL_LINES_MAX + 1),
            notable: VecDeque::with_capacity(NOTABLE_LINES_MAX + 1),
            hash: FNV_OFFSET,
            lines: 0,
            full: None,
        }
    }

    pub fn keep_full(&mut self) {
        self.full = Some(Vec::new());
    }

    /// Records one line; `notable` lines are everything but message deliveries.
    pub fn log(&mut self, now_ms: u64, line: String, notable: bool) {
        let line = format!("{now_ms:>7} {line}");
        for b in line.bytes().chain(std::iter::once(b'\n')) {
            self.hash ^= u64::from(b);
            self.hash = self.hash.wrapping_mul(FNV_PRIME);
        }
        self.lines += 1;
        if let Some(full) = &mut self.full {
            full.push(line.clone());
        }
        if notable {
            if self.notable.len() == NOTABLE_LINES_MAX {
                self.notable.pop_front();
            }
            self.notable.push_back(line.clone());
        }
        if self.tail.len() == TAIL_LINES_MAX {
            self.tail.pop_front();
        }
        self.tail.push_back(line);
    }

    pub fn hash(&self) -> u64 {
        self.hash
    }

    pub fn tail(&self) -> Vec<String> {
        self.tail.iter().cloned().collect()
    }

    pub fn notable_tail(&self) -> Vec<String> {
        self.notable.iter().cloned().collect()
    }

    pub fn full(&self) -> Vec<String> {
        self.full.clone().unwrap_or_default()
    }
}
