//! Token-length budgets: what happens to a sequence longer than `max_length` (truncate or drop),
//! as a pure decision per sequence plus counters for the data report. The stage cuts the tokens.
use std::fmt;

use serde::{Deserialize, Serialize};

/// What to do with a sequence longer than the budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LengthPolicy {
    /// Keep the first `max_length` tokens.
    #[default]
    Truncate,
    /// Leave the record out.
    Drop,
}

/// The decision for one sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LengthDecision {
    Keep,
    Truncate { to: usize },
    Drop,
}

/// A `max_length` in tokens and the policy for longer sequences.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LengthBudget {
    pub max_length: usize,
    pub policy: LengthPolicy,
}

impl LengthBudget {
    pub fn new(max_length: usize, policy: LengthPolicy) -> Self {
        LengthBudget { max_length, policy }
    }

    /// The decision for a sequence of `length` tokens.
    pub fn decide(&self, length: usize) -> LengthDecision {
        if length <= self.max_length {
            LengthDecision::Keep
        } else {
            match self.policy {
                LengthPolicy::Truncate => LengthDecision::Truncate { to: self.max_length },
                LengthPolicy::Drop => LengthDecision::Drop,
            }
        }
    }

    /// Counts the decisions for many sequences.
    pub fn tally(&self, lengths: &[usize]) -> LengthBudgetCounts {
        let mut counts = LengthBudgetCounts::new(*self);
        for &len in lengths {
            counts.add(self.decide(len));
        }
        counts
    }
}

/// How many sequences a budget kept whole, truncated and dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LengthBudgetCounts {
    pub budget: LengthBudget,
    pub kept: usize,
    pub truncated: usize,
    pub dropped: usize,
}

impl LengthBudgetCounts {
    pub fn new(budget: LengthBudget) -> Self {
        LengthBudgetCounts { budget, kept: 0, truncated: 0, dropped: 0 }
    }

    pub fn add(&mut self, decision: LengthDecision) {
        match decision {
            LengthDecision::Keep => self.kept += 1,
            LengthDecision::Truncate { .. } => self.truncated += 1,
            LengthDecision::Drop => self.dropped += 1,
        }
    }
}

impl fmt::Display for LengthBudgetCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "max_length {}: {} kept whole, {} truncated, {} dropped",
            self.budget.max_length, self.kept, self.truncated, self.dropped
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncate_and_drop_policies() {
        let t = LengthBudget::new(4, LengthPolicy::Truncate);
        assert_eq!(t.decide(4), LengthDecision::Keep);
        assert_eq!(t.decide(5), LengthDecision::Truncate { to: 4 });
        let c = t.tally(&[1, 4, 5, 9]);
        assert_eq!((c.kept, c.truncated, c.dropped), (2, 2, 0));
        let d = LengthBudget::new(4, LengthPolicy::Drop);
        assert_eq!(d.decide(5), LengthDecision::Drop);
        let c = d.tally(&[1, 4, 5, 9]);
        assert_eq!((c.kept, c.truncated, c.dropped), (2, 0, 2));
        assert_eq!(c.to_string(), "max_length 4: 2 kept whole, 0 truncated, 2 dropped");
    }
}
