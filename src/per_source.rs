//! How much of something (connections, open streams) one source address may hold at once, so
//! that a single peer cannot take what every other peer needs: the gRPC and admin listeners
//! count connections with it, the gRPC edge counts streams.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

/// Counts what each source address holds.
#[derive(Debug)]
pub struct PerSourceLimit {
    max: usize,
    counts: Mutex<HashMap<IpAddr, usize>>,
}

/// The source already holds its share.
#[derive(Debug, PartialEq, Eq)]
pub struct SourceBusy;

/// One held unit; released when dropped.
#[derive(Debug)]
pub struct SourceSlot {
    limit: Arc<PerSourceLimit>,
    source: IpAddr,
    n: usize,
}

impl PerSourceLimit {
    /// `max` at once per address; 0 means no bound.
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
        self.try_acquire_many(source, 1)
    }

    /// `n` units for `source` (e.g. bytes), unless they would take it over its share.
    pub fn try_acquire_many(
        self: &Arc<Self>,
        source: Option<IpAddr>,
        n: usize,
    ) -> Result<Option<SourceSlot>, SourceBusy> {
        let Some(source) = source.filter(|_| self.max > 0) else {
            return Ok(None);
        };
        let source = canonical(source);
        // A poisoned lock only means a holder panicked between single-step updates.
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        let count = counts.entry(source).or_insert(0);
        if count.saturating_add(n) > self.max {
            if *count == 0 {
                counts.remove(&source);
            }
            return Err(SourceBusy);
        }
        *count += n;
        Ok(Some(SourceSlot {
            limit: self.clone(),
            source,
            n,
        }))
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.counts.lock().map(|c| c.len()).unwrap_or(0)
    }
}

/// IPv4-mapped IPv6 addresses are the same peer as their IPv4 form.
pub fn canonical(source: IpAddr) -> IpAddr {
    match source {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(source, IpAddr::V4),
        v4 => v4,
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut counts = self
            .limit
            .counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = counts.get_mut(&self.source) {
            *count = count.saturating_sub(self.n);
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
    fn counts_many_units_at_once() {
        let limit = PerSourceLimit::new(100);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let sixty = limit.try_acquire_many(Some(a), 60).unwrap();
        assert!(limit.try_acquire_many(Some(a), 41).is_err());
        let forty = limit.try_acquire_many(Some(a), 40).unwrap();
        drop(sixty);
        assert!(limit.try_acquire_many(Some(a), 60).unwrap().is_some());
        drop(forty);
        assert!(limit.try_acquire_many(Some(a), 101).is_err());
        assert_eq!(limit.tracked(), 0, "a refused source is not kept");
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
