//! Resource amounts: what a job asks for and what a node offers.

use serde::{Deserialize, Serialize};
use std::ops::{Add, Sub};

/// An amount of compute. vCPUs are kept in thousandths so that fractional requests
/// (`"0.25"`) add up exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Resources {
    pub millicpus: u64,
    pub memory_mib: u64,
    pub gpus: u32,
}

impl Resources {
    pub const ZERO: Resources = Resources {
        millicpus: 0,
        memory_mib: 0,
        gpus: 0,
    };

    pub fn new(millicpus: u64, memory_mib: u64, gpus: u32) -> Self {
        Self {
            millicpus,
            memory_mib,
            gpus,
        }
    }

    /// True when every dimension of `self` fits inside `other`.
    pub fn fits_in(&self, other: &Resources) -> bool {
        self.millicpus <= other.millicpus
            && self.memory_mib <= other.memory_mib
            && self.gpus <= other.gpus
    }

    pub fn saturating_sub(&self, other: &Resources) -> Resources {
        Resources {
            millicpus: self.millicpus.saturating_sub(other.millicpus),
            memory_mib: self.memory_mib.saturating_sub(other.memory_mib),
            gpus: self.gpus.saturating_sub(other.gpus),
        }
    }

    /// vCPUs as a user reads them (`1.5`).
    pub fn vcpus(&self) -> f64 {
        self.millicpus as f64 / 1000.0
    }
}

impl Add for Resources {
    type Output = Resources;
    fn add(self, o: Resources) -> Resources {
        Resources {
            millicpus: self.millicpus + o.millicpus,
            memory_mib: self.memory_mib + o.memory_mib,
            gpus: self.gpus + o.gpus,
        }
    }
}

impl Sub for Resources {
    type Output = Resources;
    fn sub(self, o: Resources) -> Resources {
        self.saturating_sub(&o)
    }
}
