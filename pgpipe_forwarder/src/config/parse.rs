//! Parsers of sizes and listen addresses.

use super::*;

/// Parses a listen address: `:8080` (all interfaces), `localhost:8080`, `127.0.0.1:8080`,
/// `[::1]:8080`. Host names other than `localhost` are not resolved.
pub fn parse_listen_addr(addr: &str) -> Result<SocketAddr, String> {
    let port_of = |p: &str| {
        p.parse::<u16>()
            .map_err(|_| format!("port {p:?} is not a number from 0 to 65535"))
    };
    if let Some(port) = addr.strip_prefix(':') {
        return Ok(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            port_of(port)?,
        ));
    }
    if let Some(port) = addr.strip_prefix("localhost:") {
        return Ok(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            port_of(port)?,
        ));
    }
    SocketAddr::from_str(addr)
        .map_err(|_| "expected :PORT, localhost:PORT or IP:PORT (IPv6 in brackets)".to_owned())
}

/// Parses a byte size: a plain integer, or a number with a unit. `K`, `M`, `G`, `T` and
/// `KiB`, `MiB`, `GiB`, `TiB` (also `Ki`…) are powers of 1024; `KB`, `MB`, `GB`, `TB` are
/// powers of 1000; `B` is bytes. Case-insensitive; a space before the unit is allowed.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let unit = unit.trim().to_ascii_lowercase();
    let multiplier: u64 = match unit.as_str() {
        "" | "b" => 1,
        "k" | "ki" | "kib" => 1 << 10,
        "m" | "mi" | "mib" => 1 << 20,
        "g" | "gi" | "gib" => 1 << 30,
        "t" | "ti" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => return Err(format!("invalid size {text:?}: unknown unit {unit:?}")),
    };
    if number.is_empty() {
        return Err(format!("invalid size {text:?}: expected a number"));
    }
    if let Ok(n) = number.parse::<u64>() {
        return n
            .checked_mul(multiplier)
            .ok_or_else(|| format!("invalid size {text:?}: too large"));
    }
    let n: f64 = number
        .parse()
        .map_err(|_| format!("invalid size {text:?}: expected a number"))?;
    let bytes = (n * multiplier as f64).round();
    if bytes.is_finite() && bytes >= 0.0 && bytes < u64::MAX as f64 {
        // In range and rounded: the cast is exact enough for a file size.
        Ok(bytes as u64)
    } else {
        Err(format!("invalid size {text:?}: too large"))
    }
}

/// Deserializes a byte size from an integer or a string with a unit (see [`parse_size`]).
pub(crate) mod size_serde {
    use serde::de::{self, Deserializer, Visitor};
    use std::fmt;

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        d.deserialize_any(SizeVisitor)
    }

    struct SizeVisitor;

    impl Visitor<'_> for SizeVisitor {
        type Value = u64;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a size in bytes, as an integer or a string like \"100MiB\"")
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
            Ok(v)
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
            u64::try_from(v).map_err(|_| E::invalid_value(de::Unexpected::Signed(v), &self))
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
            super::parse_size(v).map_err(E::custom)
        }
    }
}
