//! `pgpipe.uuid_generate_v7()`: RFC 9562 UUIDv7 with a 12-bit sub-millisecond fraction
//! (the RFC's "method 3"), strictly increasing within a backend.
//!
//! Sub-millisecond precision matters for ordering: a transaction that waited for another
//! one's row lock mints its ids after the wait, so they sort after the other's.

use std::cell::Cell;
use std::time::{SystemTime, UNIX_EPOCH};

use pgrx::prelude::*;

thread_local! {
    /// Last timestamp handed out, as `unix_ms << 12 | fraction`.
    static LAST_STAMP: Cell<u64> = const { Cell::new(0) };
    /// xorshift64* state; seeded from `pg_strong_random` on first use.
    static RNG_STATE: Cell<u64> = const { Cell::new(0) };
}

/// Returns a new UUIDv7, greater than any this backend returned before.
#[pg_extern(volatile, parallel_safe, name = "uuid_generate_v7")]
pub fn uuid_generate_v7() -> pgrx::Uuid {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let stamp = LAST_STAMP.with(|last| {
        let stamp = next_stamp(last.get(), now.as_millis() as u64, now.subsec_nanos());
        last.set(stamp);
        stamp
    });
    pgrx::Uuid::from_bytes(encode(stamp, next_random()))
}

/// The 60-bit stamp for `unix_ms` and the nanoseconds within the second, bumped past `last`
/// when the clock has not moved (or went backwards) so ids never repeat or decrease.
pub(crate) fn next_stamp(last: u64, unix_ms: u64, subsec_nanos: u32) -> u64 {
    let nanos_in_ms = u64::from(subsec_nanos % 1_000_000);
    let fraction = nanos_in_ms * 4096 / 1_000_000;
    let stamp = ((unix_ms & 0xFFFF_FFFF_FFFF) << 12) | fraction;
    if stamp > last {
        stamp
    } else {
        last + 1
    }
}

/// Lays out the RFC 9562 fields: 48-bit ms, version 7, 12-bit fraction, variant 0b10, 62 random bits.
pub(crate) fn encode(stamp: u64, random: u64) -> [u8; 16] {
    let unix_ms = stamp >> 12;
    let fraction = (stamp & 0xFFF) as u16;
    let mut bytes = [0u8; 16];
    bytes[..6].copy_from_slice(&unix_ms.to_be_bytes()[2..]);
    bytes[6] = 0x70 | (fraction >> 8) as u8;
    bytes[7] = fraction as u8;
    bytes[8..].copy_from_slice(&random.to_be_bytes());
    bytes[8] = 0x80 | (bytes[8] & 0x3F);
    bytes
}

fn next_random() -> u64 {
    RNG_STATE.with(|state| {
        let mut x = state.get();
        if x == 0 {
            x = strong_seed();
        }
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        state.set(x);
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    })
}

fn strong_seed() -> u64 {
    let mut seed = [0u8; 8];
    // SAFETY: the buffer is valid for 8 bytes.
    let ok = unsafe { pg_sys::pg_strong_random(seed.as_mut_ptr().cast(), seed.len()) };
    let seed = u64::from_ne_bytes(seed);
    if ok && seed != 0 {
        seed
    } else {
        // No strong randomness: the time and pid still make backends differ.
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
        (nanos ^ (u64::from(std::process::id()) << 32)) | 1
    }
}
