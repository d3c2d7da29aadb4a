#![forbid(unsafe_code)]
//! istio-csr-rs: an Istio certificate authority agent. See README.md and docs/.

pub mod admin;
pub mod app;
pub mod bundle;
pub mod client;
pub mod cluster;
pub mod config;
pub mod fswatch;
pub mod istiod;
pub mod leader;
pub mod per_source;
pub mod pki;
pub mod retry;
pub mod signer;
pub mod standalone;

pub mod proto {
    //! The Istio CA wire protocol (`proto/istio/v1/auth/ca.proto`).
    #![allow(clippy::all, missing_docs)]
    pub mod istio_v1_auth {
        tonic::include_proto!("istio.v1.auth");
    }
}
