//! Pure PKI logic: no I/O, no clocks read here (callers pass `now`).

pub mod chain;
pub mod csr;
pub mod der;
pub mod identity;
pub mod keys;
pub mod leaf;
pub mod pem;

#[cfg(any(test, feature = "testing"))]
pub mod testing;
