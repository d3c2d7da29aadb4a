//! How many CreateCertificate calls one source address may have in progress: a single peer
//! (or a few) must not hold every `--max-inflight` slot and lock everyone else out. A NAT or an
//! east-west gateway funnels many callers through one address, so the share is generous, and
//! settable (`--max-inflight-per-source`, 0 = no per-source bound).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Counts calls in progress per source address.
#[derive(Debug)]
pub struct PerSourceLimit {
    max: usize,
    counts: Mutex<HashMap<IpAddr, usize>>,
}

/// The source already holds its share.
#[derive(Debug, PartialEq, Eq)]
pub struct SourceBusy;

/// One call's place; released when dropped.
#[derive(Debug)]
pub struct SourceSlot {
    limit: Arc<PerSourceLimit>,
    source: IpAddr,
}

impl PerSourceLimit {
    /// `max` calls at once per address; 0 means no bound.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            counts: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for `source`, unless it already holds its share. `None` source (no address
    /// known, e.g. in-process tests) is not bounded here.
    pub fn try_acquire(
        self: &Arc<Self>,
        source: Option<IpAddr>,
    ) -> Result<Option<SourceSlot>, SourceBusy> {
        let Some(source) = source.filter(|_| self.max > 0) else {
            return Ok(None);
        };
        // IPv4-mapped IPv6 addresses are the same peer as their IPv4 form.
        let source = match source {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(source, IpAddr::V4),
            v4 => v4,
        };
        let mut counts = self.counts.lock().map_err(|_| SourceBusy)?;
        let count = counts.entry(source).or_insert(0);
        if *count >= self.max {
            return Err(SourceBusy);
        }
        *count += 1;
        Ok(Some(SourceSlot {
            limit: self.clone(),
            source,
        }))
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.counts.lock().map(|c| c.len()).unwrap_or(0)
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        if let Ok(mut counts) = self.limit.counts.lock()
            && let Some(count) = counts.get_mut(&self.source)
        {
            *count -= 1;
            // Addresses with nothing in progress are forgotten: the map stays as small as
            // the set of callers being served.
            if *count == 0 {
                counts.remove(&self.source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_source_gets_its_share_and_others_are_not_affected() {
        let limit = PerSourceLimit::new(2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let first = limit.try_acquire(Some(a)).unwrap();
        let second = limit.try_acquire(Some(a)).unwrap();
        assert!(
            limit.try_acquire(Some(a)).is_err(),
            "a third call from one source"
        );
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert!(
            limit.try_acquire(Some(mapped)).is_err(),
            "the same peer over IPv6"
        );
        assert!(limit.try_acquire(Some(b)).unwrap().is_some());
        drop(first);
        assert!(limit.try_acquire(Some(a)).unwrap().is_some());
        drop(second);
    }

    #[test]
    fn finished_sources_are_forgotten_and_zero_means_unbounded() {
        let limit = PerSourceLimit::new(1);
        for i in 0..100u8 {
            let slot = limit
                .try_acquire(Some(IpAddr::from([10, 0, 1, i])))
                .unwrap();
            drop(slot);
        }
        assert_eq!(limit.tracked(), 0);
        let unbounded = PerSourceLimit::new(0);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let slots: Vec<_> = (0..10)
            .map(|_| unbounded.try_acquire(Some(a)).unwrap())
            .collect();
        assert!(slots.iter().all(Option::is_none));
        assert!(limit.try_acquire(None).unwrap().is_none());
    }
}
