//! Guest artifacts as bytes: the example functions and the test guests from
//! `guests/`, compiled by this crate's build script. It only carries bytes;
//! it never runs or inspects them.

include!(concat!(env!("OUT_DIR"), "/guests.rs"));
