//! A decoder for the pgoutput logical replication protocol, version 1 (the messages
//! `pg_logical_slot_peek_binary_changes(..., 'proto_version', '1', ...)` returns).
//!
//! Pure Rust, no Postgres calls: every message is parsed from its bytes into a
//! [`Message`]. See "Logical Replication Message Formats" in the Postgres manual.

use std::fmt;

/// A log sequence number.
pub type Lsn = u64;

/// One column value of a tuple.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    /// SQL NULL.
    Null,
    /// A TOASTed value that did not change (its bytes are not in the WAL record).
    UnchangedToast,
    /// The value in its type's text output format.
    Text(String),
    /// The value in its type's binary format (only with the `binary` option).
    Binary(Vec<u8>),
}

/// A tuple: one value per (non-dropped, non-generated) column of the relation.
pub type Tuple = Vec<Value>;

/// A column of a [`Relation`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Column {
    /// Part of the replica identity (the key sent for UPDATE/DELETE).
    pub key: bool,
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
}

/// A relation's description, sent before its first change in a session and after any
/// change to its definition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Relation {
    pub oid: u32,
    /// Schema name; pgoutput sends an empty string for `pg_catalog`.
    pub namespace: String,
    pub name: String,
    /// `pg_class.relreplident`: `d` default (primary key), `n` nothing, `f` full, `i` index.
    pub replica_identity: u8,
    pub columns: Vec<Column>,
}

/// The old image sent with UPDATE or DELETE.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OldTuple {
    /// Only the replica identity columns carry values (`K`); the others are NULL.
    Key(Tuple),
    /// The whole old row (`O`, REPLICA IDENTITY FULL).
    Full(Tuple),
}

/// A decoded pgoutput message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    Begin {
        /// LSN of the commit record (its start).
        final_lsn: Lsn,
        /// Commit time, microseconds since 2000-01-01 UTC.
        commit_time: i64,
        xid: u32,
    },
    Commit {
        flags: u8,
        /// LSN of the commit record.
        commit_lsn: Lsn,
        /// End of the commit record: where decoding resumes after this transaction.
        end_lsn: Lsn,
        commit_time: i64,
    },
    Origin {
        lsn: Lsn,
        name: String,
    },
    Relation(Relation),
    Type {
        oid: u32,
        namespace: String,
        name: String,
    },
    Insert {
        relation: u32,
        new: Tuple,
    },
    Update {
        relation: u32,
        old: Option<OldTuple>,
        new: Tuple,
    },
    Delete {
        relation: u32,
        old: OldTuple,
    },
    Truncate {
        /// Bit 1: CASCADE, bit 2: RESTART IDENTITY.
        options: u8,
        relations: Vec<u32>,
    },
    /// A logical decoding message (`pg_logical_emit_message`), with `messages` on.
    Logical {
        transactional: bool,
        lsn: Lsn,
        prefix: String,
        content: Vec<u8>,
    },
}

/// Why a message could not be decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodeError(String);

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed pgoutput message: {}", self.0)
    }
}

impl std::error::Error for DecodeError {}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() - self.pos < n {
            return Err(DecodeError(format!(
                "{what}: need {n} bytes at offset {}, have {}",
                self.pos,
                self.buf.len() - self.pos
            )));
        }
        let slice = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(slice)
    }

    fn u8(&mut self, what: &str) -> Result<u8, DecodeError> {
        Ok(self.take(1, what)?[0])
    }

    fn i16(&mut self, what: &str) -> Result<i16, DecodeError> {
        Ok(i16::from_be_bytes(self.take(2, what)?.try_into().unwrap()))
    }

    fn i32(&mut self, what: &str) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.take(4, what)?.try_into().unwrap()))
    }

    fn u32(&mut self, what: &str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.take(4, what)?.try_into().unwrap()))
    }

    fn i64(&mut self, what: &str) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.take(8, what)?.try_into().unwrap()))
    }

    fn u64(&mut self, what: &str) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.take(8, what)?.try_into().unwrap()))
    }

    fn string(&mut self, what: &str) -> Result<String, DecodeError> {
        let rest = &self.buf[self.pos..];
        let len = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| DecodeError(format!("{what}: unterminated string")))?;
        let s = String::from_utf8(rest[..len].to_vec())
            .map_err(|_| DecodeError(format!("{what}: not UTF-8")))?;
        self.pos += len + 1;
        Ok(s)
    }

    fn tuple(&mut self) -> Result<Tuple, DecodeError> {
        let n = self.i16("tuple column count")?;
        if n < 0 {
            return Err(DecodeError(format!("negative column count {n}")));
        }
        let mut values = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let value = match self.u8("column kind")? {
                b'n' => Value::Null,
                b'u' => Value::UnchangedToast,
                kind @ (b't' | b'b') => {
                    let len = self.i32("column length")?;
                    if len < 0 {
                        return Err(DecodeError(format!("negative value length {len}")));
                    }
                    let bytes = self.take(len as usize, "column value")?;
                    if kind == b't' {
                        Value::Text(
                            String::from_utf8(bytes.to_vec())
                                .map_err(|_| DecodeError("text value is not UTF-8".into()))?,
                        )
                    } else {
                        Value::Binary(bytes.to_vec())
                    }
                }
                other => {
                    return Err(DecodeError(format!(
                        "unknown column kind {:?}",
                        other as char
                    )))
                }
            };
            values.push(value);
        }
        Ok(values)
    }

    fn finish(self, message: Message) -> Result<Message, DecodeError> {
        if self.pos == self.buf.len() {
            Ok(message)
        } else {
            Err(DecodeError(format!(
                "{} trailing bytes after {:?}",
                self.buf.len() - self.pos,
                self.buf[0] as char
            )))
        }
    }
}

/// Decodes one pgoutput message.
pub fn decode(buf: &[u8]) -> Result<Message, DecodeError> {
    let mut r = Reader { buf, pos: 0 };
    let tag = r.u8("message type")?;
    let message = match tag {
        b'B' => Message::Begin {
            final_lsn: r.u64("final lsn")?,
            commit_time: r.i64("commit time")?,
            xid: r.u32("xid")?,
        },
        b'C' => Message::Commit {
            flags: r.u8("flags")?,
            commit_lsn: r.u64("commit lsn")?,
            end_lsn: r.u64("end lsn")?,
            commit_time: r.i64("commit time")?,
        },
        b'O' => Message::Origin {
            lsn: r.u64("origin lsn")?,
            name: r.string("origin name")?,
        },
        b'R' => {
            let oid = r.u32("relation oid")?;
            let namespace = r.string("namespace")?;
            let name = r.string("relation name")?;
            let replica_identity = r.u8("replica identity")?;
            let n = r.i16("column count")?;
            let mut columns = Vec::with_capacity(n.max(0) as usize);
            for _ in 0..n {
                columns.push(Column {
                    key: r.u8("column flags")? & 1 == 1,
                    name: r.string("column name")?,
                    type_oid: r.u32("column type")?,
                    type_modifier: r.i32("column typmod")?,
                });
            }
            Message::Relation(Relation {
                oid,
                namespace,
                name,
                replica_identity,
                columns,
            })
        }
        b'Y' => Message::Type {
            oid: r.u32("type oid")?,
            namespace: r.string("type namespace")?,
            name: r.string("type name")?,
        },
        b'I' => {
            let relation = r.u32("relation oid")?;
            match r.u8("tuple kind")? {
                b'N' => Message::Insert {
                    relation,
                    new: r.tuple()?,
                },
                other => return Err(DecodeError(format!("INSERT: tuple kind {other}"))),
            }
        }
        b'U' => {
            let relation = r.u32("relation oid")?;
            let (old, kind) = match r.u8("tuple kind")? {
                b'K' => (Some(OldTuple::Key(r.tuple()?)), r.u8("tuple kind")?),
                b'O' => (Some(OldTuple::Full(r.tuple()?)), r.u8("tuple kind")?),
                kind => (None, kind),
            };
            if kind != b'N' {
                return Err(DecodeError(format!("UPDATE: tuple kind {kind}")));
            }
            Message::Update {
                relation,
                old,
                new: r.tuple()?,
            }
        }
        b'D' => {
            let relation = r.u32("relation oid")?;
            let old = match r.u8("tuple kind")? {
                b'K' => OldTuple::Key(r.tuple()?),
                b'O' => OldTuple::Full(r.tuple()?),
                other => return Err(DecodeError(format!("DELETE: tuple kind {other}"))),
            };
            Message::Delete { relation, old }
        }
        b'T' => {
            let n = r.u32("relation count")?;
            let options = r.u8("truncate options")?;
            let mut relations = Vec::with_capacity(n.min(1 << 16) as usize);
            for _ in 0..n {
                relations.push(r.u32("relation oid")?);
            }
            Message::Truncate { options, relations }
        }
        b'M' => {
            let transactional = r.u8("message flags")? & 1 == 1;
            let lsn = r.u64("message lsn")?;
            let prefix = r.string("message prefix")?;
            let len = r.u32("message length")?;
            let content = r.take(len as usize, "message content")?.to_vec();
            Message::Logical {
                transactional,
                lsn,
                prefix,
                content,
            }
        }
        other => {
            return Err(DecodeError(format!(
                "unknown message type {:?}",
                other as char
            )))
        }
    };
    r.finish(message)
}

/// Parses Postgres' `X/Y` text form of an LSN.
pub fn parse_lsn(text: &str) -> Option<Lsn> {
    let (hi, lo) = text.trim().split_once('/')?;
    let hi = u32::from_str_radix(hi, 16).ok()?;
    let lo = u32::from_str_radix(lo, 16).ok()?;
    Some((u64::from(hi) << 32) | u64::from(lo))
}

/// Formats an LSN as Postgres does (`16/B374D848`).
pub fn format_lsn(lsn: Lsn) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds messages the way pgoutput writes them.
    #[derive(Default)]
    struct W(Vec<u8>);

    impl W {
        fn u8(mut self, v: u8) -> Self {
            self.0.push(v);
            self
        }
        fn i16(mut self, v: i16) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn i32(mut self, v: i32) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn u32(mut self, v: u32) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn u64(mut self, v: u64) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn s(mut self, v: &str) -> Self {
            self.0.extend_from_slice(v.as_bytes());
            self.0.push(0);
            self
        }
        fn text(self, v: &str) -> Self {
            let mut w = self.u8(b't').i32(v.len() as i32);
            w.0.extend_from_slice(v.as_bytes());
            w
        }
    }

    #[test]
    fn begin_and_commit() {
        let begin = W::default().u8(b'B').u64(0x1_0000_0010).u64(42).u32(777).0;
        assert_eq!(
            decode(&begin).unwrap(),
            Message::Begin {
                final_lsn: 0x1_0000_0010,
                commit_time: 42,
                xid: 777
            }
        );
        let commit = W::default().u8(b'C').u8(0).u64(10).u64(20).u64(42).0;
        assert_eq!(
            decode(&commit).unwrap(),
            Message::Commit {
                flags: 0,
                commit_lsn: 10,
                end_lsn: 20,
                commit_time: 42
            }
        );
    }

    #[test]
    fn relation_with_key_column() {
        let msg = W::default()
            .u8(b'R')
            .u32(16384)
            .s("public")
            .s("orders")
            .u8(b'f')
            .i16(2)
            .u8(1)
            .s("id")
            .u32(23)
            .i32(-1)
            .u8(0)
            .s("note")
            .u32(1043)
            .i32(14)
            .0;
        let Message::Relation(rel) = decode(&msg).unwrap() else {
            panic!("not a relation")
        };
        assert_eq!(rel.oid, 16384);
        assert_eq!(
            (rel.namespace.as_str(), rel.name.as_str()),
            ("public", "orders")
        );
        assert_eq!(rel.replica_identity, b'f');
        assert!(rel.columns[0].key && !rel.columns[1].key);
        assert_eq!(rel.columns[1].type_modifier, 14);
    }

    #[test]
    fn insert_with_null_and_text() {
        let msg = W::default()
            .u8(b'I')
            .u32(5)
            .u8(b'N')
            .i16(3)
            .text("1")
            .u8(b'n')
            .text("héllo")
            .0;
        assert_eq!(
            decode(&msg).unwrap(),
            Message::Insert {
                relation: 5,
                new: vec![
                    Value::Text("1".into()),
                    Value::Null,
                    Value::Text("héllo".into())
                ]
            }
        );
    }

    #[test]
    fn update_with_and_without_old_tuple() {
        let plain = W::default()
            .u8(b'U')
            .u32(5)
            .u8(b'N')
            .i16(2)
            .text("1")
            .u8(b'u')
            .0;
        assert_eq!(
            decode(&plain).unwrap(),
            Message::Update {
                relation: 5,
                old: None,
                new: vec![Value::Text("1".into()), Value::UnchangedToast]
            }
        );
        let full = W::default()
            .u8(b'U')
            .u32(5)
            .u8(b'O')
            .i16(1)
            .text("old")
            .u8(b'N')
            .i16(1)
            .text("new")
            .0;
        assert_eq!(
            decode(&full).unwrap(),
            Message::Update {
                relation: 5,
                old: Some(OldTuple::Full(vec![Value::Text("old".into())])),
                new: vec![Value::Text("new".into())]
            }
        );
        let key = W::default()
            .u8(b'U')
            .u32(5)
            .u8(b'K')
            .i16(1)
            .text("7")
            .u8(b'N')
            .i16(1)
            .text("8")
            .0;
        assert!(matches!(
            decode(&key).unwrap(),
            Message::Update {
                old: Some(OldTuple::Key(_)),
                ..
            }
        ));
    }

    #[test]
    fn delete_and_truncate() {
        let delete = W::default().u8(b'D').u32(9).u8(b'K').i16(1).text("3").0;
        assert_eq!(
            decode(&delete).unwrap(),
            Message::Delete {
                relation: 9,
                old: OldTuple::Key(vec![Value::Text("3".into())])
            }
        );
        let truncate = W::default().u8(b'T').u32(2).u8(1).u32(9).u32(10).0;
        assert_eq!(
            decode(&truncate).unwrap(),
            Message::Truncate {
                options: 1,
                relations: vec![9, 10]
            }
        );
    }

    #[test]
    fn logical_message() {
        let mut msg = W::default().u8(b'M').u8(1).u64(99).s("pgpipe").u32(2).0;
        msg.extend_from_slice(b"{}");
        assert_eq!(
            decode(&msg).unwrap(),
            Message::Logical {
                transactional: true,
                lsn: 99,
                prefix: "pgpipe".into(),
                content: b"{}".to_vec()
            }
        );
    }

    #[test]
    fn rejects_truncated_unknown_and_trailing_input() {
        assert!(decode(&[]).is_err());
        assert!(decode(b"Z").is_err());
        let short = W::default().u8(b'B').u64(1).0;
        assert!(decode(&short)
            .unwrap_err()
            .to_string()
            .contains("commit time"));
        let long = W::default().u8(b'B').u64(1).u64(2).u32(3).u8(0).0;
        assert!(decode(&long).unwrap_err().to_string().contains("trailing"));
        let bad_len = W::default()
            .u8(b'I')
            .u32(1)
            .u8(b'N')
            .i16(1)
            .u8(b't')
            .i32(10)
            .0;
        assert!(decode(&bad_len).is_err());
    }

    #[test]
    fn lsn_text_round_trip() {
        assert_eq!(parse_lsn("16/B374D848"), Some(0x16_B374_D848));
        assert_eq!(format_lsn(0x16_B374_D848), "16/B374D848");
        assert_eq!(format_lsn(0), "0/0");
        assert_eq!(parse_lsn("nope"), None);
    }
}
