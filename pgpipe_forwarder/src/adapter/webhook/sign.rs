//! Request signing.
//!
//! - Standard Webhooks (<https://www.standardwebhooks.com>): `webhook-signature:
//!   v1,<base64 HMAC-SHA256 of "{webhook-id}.{webhook-timestamp}.{body}">`. A key written
//!   `whsec_<base64>` is base64-decoded, as the spec says; any other key is used as its
//!   raw bytes.
//! - The original pgpipe's `X-PGPipe-Signature: sha256=<hex HMAC-SHA256 of the body>`,
//!   keyed with the key exactly as configured (its raw bytes, even for `whsec_` keys), so
//!   receivers written for the original keep verifying.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::error::Error;

/// Prefix of keys in the Standard Webhooks secret format.
const WHSEC_PREFIX: &str = "whsec_";

/// Signs webhook requests with one key.
#[derive(Clone)]
pub struct Signer {
    standard_key: Vec<u8>,
    raw_key: Vec<u8>,
}

impl Signer {
    /// A signer for `key`; a `whsec_` key whose rest is not base64 is an error.
    pub fn new(key: &str) -> Result<Signer, Error> {
        let standard_key = match key.strip_prefix(WHSEC_PREFIX) {
            Some(encoded) => STANDARD.decode(encoded.trim()).map_err(|e| {
                Error::Config(format!(
                    "webhook.signing_key: a whsec_ key must be base64 after the prefix: {e}"
                ))
            })?,
            None => key.as_bytes().to_vec(),
        };
        Ok(Signer {
            standard_key,
            raw_key: key.as_bytes().to_vec(),
        })
    }

    /// The `webhook-signature` value for message `id` sent at unix time `timestamp`.
    pub fn standard(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let mut mac = hmac(&self.standard_key);
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
    }

    /// The `X-PGPipe-Signature` value: `sha256=<hex>`.
    pub fn pgpipe(&self, body: &[u8]) -> String {
        let mut mac = hmac(&self.raw_key);
        mac.update(body);
        let digest = mac.finalize().into_bytes();
        let mut out = String::with_capacity(7 + 64);
        out.push_str("sha256=");
        for b in digest.iter() {
            out.push_str(&format!("{b:02x}"));
        }
        out
    }
}

fn hmac(key: &[u8]) -> Hmac<Sha256> {
    Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_webhooks_spec_example() {
        // The example from the Standard Webhooks specification and its reference libraries.
        let signer = Signer::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            signer.standard("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn pgpipe_signature_is_hex_hmac_of_the_body_with_the_raw_key() {
        // RFC 4231 test case 2.
        let signer = Signer::new("Jefe").unwrap();
        assert_eq!(
            signer.pgpipe(b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn bad_whsec_key_is_a_config_error() {
        let err = Signer::new("whsec_***").err().expect("rejected");
        assert!(err.to_string().contains("base64"), "{err}");
    }
}
