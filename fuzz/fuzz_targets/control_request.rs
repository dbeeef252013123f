//! Fuzzes the master target's control-socket parsing (`boomerang_mt::control`): the
//! daemon reads one request line (up to and including the first newline) and decodes
//! it with `serde_json::from_slice::<Request>`; the client decodes each answer line as
//! a `Reply`. Both must never panic, and whatever decodes must re-serialise to JSON that
//! decodes back to the same value and serialises to the very same bytes again (what
//! the client sends is what the daemon reads). A decoded request's `group()` is
//! called too.

#![no_main]

use boomerang_mt::control::{Reply, Request};
use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use serde::Serialize;

fuzz_target!(|data: &[u8]| {
    // As the daemon reads it: one line, newline included.
    let line = match data.iter().position(|&b| b == b'\n') {
        Some(nl) => &data[..=nl],
        None => data,
    };
    if let Some(request) = stable::<Request>(line) {
        let _ = request.group();
    }
    stable::<Reply>(line);
});

/// Decodes `bytes` as `T`; if it decodes, checks the serialisation is stable.
fn stable<T>(bytes: &[u8]) -> Option<T>
where
    T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let value: T = serde_json::from_slice(bytes).ok()?;
    let json = serde_json::to_vec(&value).expect("a decoded value serialises");
    let again: T = serde_json::from_slice(&json).expect("what we serialise decodes");
    assert_eq!(again, value, "{}", String::from_utf8_lossy(&json));
    let json2 = serde_json::to_vec(&again).expect("serialises");
    assert_eq!(json, json2, "serialisation not stable");
    Some(value)
}
