//! The job table as snapshots hold it. Each job is written once, and its [`JobSpec`] only
//! when it differs from the previous job's: an array's parent and children sort together (their
//! ids are `<parent>` and `<parent>:<index>`), so a snapshot holds one copy of an array's spec,
//! and reading it back shares that copy again instead of making one per child.

use crate::{Job, JobId, JobSpec};
use serde::de::{Error as _, SeqAccess, Visitor};
use serde::ser::SerializeSeq;
use serde::{Deserializer, Serializer};
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

pub(super) fn serialize<S: Serializer>(
    jobs: &BTreeMap<JobId, Box<Job>>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    let mut seq = serializer.serialize_seq(Some(jobs.len()))?;
    let mut previous: Option<&Arc<JobSpec>> = None;
    for job in jobs.values() {
        let spec = match previous {
            Some(p) if Arc::ptr_eq(p, &job.spec) => None,
            _ => Some(&*job.spec),
        };
        previous = Some(&job.spec);
        seq.serialize_element(&(spec, job))?;
    }
    seq.end()
}

pub(super) fn deserialize<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<BTreeMap<JobId, Box<Job>>, D::Error> {
    deserializer.deserialize_seq(JobTable)
}

struct JobTable;

impl<'de> Visitor<'de> for JobTable {
    type Value = BTreeMap<JobId, Box<Job>>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a sequence of [spec or null, job]")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut jobs = BTreeMap::new();
        let mut current: Option<Arc<JobSpec>> = None;
        while let Some((spec, mut job)) = seq.next_element::<(Option<JobSpec>, Job)>()? {
            if let Some(spec) = spec {
                current = Some(Arc::new(spec));
            }
            job.spec = current
                .clone()
                .ok_or_else(|| A::Error::custom(format!("job {} has no spec", job.id)))?;
            jobs.insert(job.id.clone(), Box::new(job));
        }
        Ok(jobs)
    }
}
