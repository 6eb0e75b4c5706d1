//! Decoding of pgoutput's logical replication messages (protocol version 1), as carried in
//! XLogData: Begin, Commit, Relation, Type, Origin, Insert, Update, Delete, Truncate.
//! Pure: bytes in, [`Message`] out. Used by the extension's background worker (which
//! reads its slot through SQL) and by the forwarder's `wal` detector (replication protocol).
//!
//! Reference: the PostgreSQL manual, "Logical Replication Message Formats".

use std::fmt;

/// A decoding failure: the message is truncated or malformed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError(pub String);

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pgoutput: {}", self.0)
    }
}

impl std::error::Error for DecodeError {}

/// One column of a relation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Column name.
    pub name: String,
    /// Type OID.
    pub type_oid: u32,
    /// Type modifier.
    pub type_modifier: i32,
    /// Part of the replica identity key.
    pub key: bool,
}

/// A Relation message: the shape of a table, sent before its first change in a session
/// and again after it changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// The table's OID.
    pub id: u32,
    /// Schema name (empty for pg_catalog).
    pub namespace: String,
    /// Table name.
    pub name: String,
    /// REPLICA IDENTITY: `d` default, `n` nothing, `f` full, `i` index.
    pub replica_identity: u8,
    /// Columns in table order.
    pub columns: Vec<Column>,
}

/// One value of a tuple.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Datum {
    /// SQL NULL.
    Null,
    /// An unchanged TOASTed value: not sent.
    UnchangedToast,
    /// The value in text format.
    Text(String),
    /// The value in binary format (only with the `binary` option, unused here).
    Binary(Vec<u8>),
}

/// The values of one row, in column order.
pub type Tuple = Vec<Datum>;

/// Which old image an Update or Delete carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OldKind {
    /// `K`: the replica identity key columns only (others are null).
    Key,
    /// `O`: the whole old row (REPLICA IDENTITY FULL).
    Full,
}

/// A decoded pgoutput message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Start of a transaction.
    Begin {
        /// LSN of the commit record.
        final_lsn: u64,
        /// Commit time, microseconds since 2000-01-01.
        commit_time: i64,
        /// 32-bit transaction id.
        xid: u32,
    },
    /// End of a transaction.
    Commit {
        /// Flags (unused).
        flags: u8,
        /// LSN of the commit record.
        commit_lsn: u64,
        /// End of the commit record: where replication resumes after it.
        end_lsn: u64,
        /// Commit time, microseconds since 2000-01-01.
        commit_time: i64,
    },
    /// Origin of a replicated transaction.
    Origin {
        /// LSN on the origin server.
        lsn: u64,
        /// Origin name.
        name: String,
    },
    /// A table's shape.
    Relation(Relation),
    /// A non-built-in type used by a relation.
    Type {
        /// Type OID.
        oid: u32,
        /// Schema name.
        namespace: String,
        /// Type name.
        name: String,
    },
    /// A new row.
    Insert {
        /// Table OID.
        relation: u32,
        /// The row.
        new: Tuple,
    },
    /// A changed row.
    Update {
        /// Table OID.
        relation: u32,
        /// The old key or row, when the identity requires it.
        old: Option<(OldKind, Tuple)>,
        /// The new row.
        new: Tuple,
    },
    /// A deleted row.
    Delete {
        /// Table OID.
        relation: u32,
        /// Its key or whole row.
        old: (OldKind, Tuple),
    },
    /// TRUNCATE of one or more tables.
    Truncate {
        /// Bit 1: CASCADE, bit 2: RESTART IDENTITY.
        options: u8,
        /// Table OIDs.
        relations: Vec<u32>,
    },
    /// A logical decoding message (`pg_logical_emit_message`).
    Message {
        /// Emitted transactionally.
        transactional: bool,
        /// Its LSN.
        lsn: u64,
        /// Prefix.
        prefix: String,
        /// Content.
        content: Vec<u8>,
    },
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], DecodeError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| DecodeError(format!("truncated {what}")))?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn u8(&mut self, what: &str) -> Result<u8, DecodeError> {
        Ok(self.take(1, what)?[0])
    }

    fn i16(&mut self, what: &str) -> Result<i16, DecodeError> {
        let b = self.take(2, what)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }

    fn i32(&mut self, what: &str) -> Result<i32, DecodeError> {
        let b = self.take(4, what)?;
        Ok(i32::from_be_bytes(b.try_into().expect("4 bytes")))
    }

    fn u32(&mut self, what: &str) -> Result<u32, DecodeError> {
        Ok(self.i32(what)? as u32)
    }

    fn i64(&mut self, what: &str) -> Result<i64, DecodeError> {
        let b = self.take(8, what)?;
        Ok(i64::from_be_bytes(b.try_into().expect("8 bytes")))
    }

    fn u64(&mut self, what: &str) -> Result<u64, DecodeError> {
        Ok(self.i64(what)? as u64)
    }

    fn string(&mut self, what: &str) -> Result<String, DecodeError> {
        let rest = &self.buf[self.pos..];
        let len = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| DecodeError(format!("unterminated {what}")))?;
        let s = String::from_utf8(rest[..len].to_vec())
            .map_err(|_| DecodeError(format!("{what} is not UTF-8")))?;
        self.pos += len + 1;
        Ok(s)
    }

    fn tuple(&mut self) -> Result<Tuple, DecodeError> {
        let n = self.i16("tuple column count")?;
        let mut out = Vec::with_capacity(n.max(0) as usize);
        for _ in 0..n {
            out.push(match self.u8("tuple column kind")? {
                b'n' => Datum::Null,
                b'u' => Datum::UnchangedToast,
                b't' => {
                    let len = self.i32("value length")?;
                    let bytes = self.take(len.max(0) as usize, "text value")?;
                    Datum::Text(
                        String::from_utf8(bytes.to_vec())
                            .map_err(|_| DecodeError("text value is not UTF-8".into()))?,
                    )
                }
                b'b' => {
                    let len = self.i32("value length")?;
                    Datum::Binary(self.take(len.max(0) as usize, "binary value")?.to_vec())
                }
                other => return Err(DecodeError(format!("unknown tuple kind {other:#x}"))),
            });
        }
        Ok(out)
    }

    fn old_kind(tag: u8) -> Option<OldKind> {
        match tag {
            b'K' => Some(OldKind::Key),
            b'O' => Some(OldKind::Full),
            _ => None,
        }
    }
}

/// Decodes one pgoutput message. `Ok(None)` for message types this module does not know
/// (streaming and two-phase messages, which protocol version 1 never sends).
pub fn decode(data: &[u8]) -> Result<Option<Message>, DecodeError> {
    let mut r = Reader { buf: data, pos: 0 };
    let tag = r.u8("message tag")?;
    let msg = match tag {
        b'B' => Message::Begin {
            final_lsn: r.u64("begin lsn")?,
            commit_time: r.i64("begin time")?,
            xid: r.u32("begin xid")?,
        },
        b'C' => Message::Commit {
            flags: r.u8("commit flags")?,
            commit_lsn: r.u64("commit lsn")?,
            end_lsn: r.u64("commit end lsn")?,
            commit_time: r.i64("commit time")?,
        },
        b'O' => Message::Origin {
            lsn: r.u64("origin lsn")?,
            name: r.string("origin name")?,
        },
        b'R' => {
            let id = r.u32("relation id")?;
            let namespace = r.string("namespace")?;
            let name = r.string("relation name")?;
            let replica_identity = r.u8("replica identity")?;
            let n = r.i16("column count")?;
            let mut columns = Vec::with_capacity(n.max(0) as usize);
            for _ in 0..n {
                let flags = r.u8("column flags")?;
                columns.push(Column {
                    name: r.string("column name")?,
                    type_oid: r.u32("column type")?,
                    type_modifier: r.i32("column typmod")?,
                    key: flags & 1 == 1,
                });
            }
            Message::Relation(Relation {
                id,
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
            let relation = r.u32("relation id")?;
            match r.u8("insert tuple tag")? {
                b'N' => Message::Insert {
                    relation,
                    new: r.tuple()?,
                },
                other => return Err(DecodeError(format!("insert: unexpected tag {other:#x}"))),
            }
        }
        b'U' => {
            let relation = r.u32("relation id")?;
            let mut tag = r.u8("update tuple tag")?;
            let mut old = None;
            if let Some(kind) = Reader::old_kind(tag) {
                old = Some((kind, r.tuple()?));
                tag = r.u8("update new tuple tag")?;
            }
            if tag != b'N' {
                return Err(DecodeError(format!("update: unexpected tag {tag:#x}")));
            }
            Message::Update {
                relation,
                old,
                new: r.tuple()?,
            }
        }
        b'D' => {
            let relation = r.u32("relation id")?;
            let tag = r.u8("delete tuple tag")?;
            let kind = Reader::old_kind(tag)
                .ok_or_else(|| DecodeError(format!("delete: unexpected tag {tag:#x}")))?;
            Message::Delete {
                relation,
                old: (kind, r.tuple()?),
            }
        }
        b'T' => {
            let n = r.i32("truncate relation count")?;
            let options = r.u8("truncate options")?;
            let mut relations = Vec::with_capacity(n.max(0) as usize);
            for _ in 0..n {
                relations.push(r.u32("truncate relation id")?);
            }
            Message::Truncate { options, relations }
        }
        b'M' => {
            let flags = r.u8("message flags")?;
            let lsn = r.u64("message lsn")?;
            let prefix = r.string("message prefix")?;
            let len = r.i32("message length")?;
            Message::Message {
                transactional: flags & 1 == 1,
                lsn,
                prefix,
                content: r.take(len.max(0) as usize, "message content")?.to_vec(),
            }
        }
        _ => return Ok(None),
    };
    if r.pos != data.len() {
        // A framing error: the message was longer than its kind allows.
        return Err(DecodeError(format!(
            "{} trailing bytes after message {:?}",
            data.len() - r.pos,
            tag as char
        )));
    }
    Ok(Some(msg))
}

/// Parses Postgres' `X/Y` text form of an LSN.
pub fn parse_lsn(text: &str) -> Option<u64> {
    let (hi, lo) = text.trim().split_once('/')?;
    let hi = u32::from_str_radix(hi, 16).ok()?;
    let lo = u32::from_str_radix(lo, 16).ok()?;
    Some((u64::from(hi) << 32) | u64::from(lo))
}

/// Formats an LSN as Postgres does (`16/B374D848`).
pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// Encoders for tests (of this module and of the change builder).
#[cfg(test)]
pub mod encode {
    use super::*;

    /// Appends a NUL-terminated string.
    pub fn string(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(s.as_bytes());
        out.push(0);
    }

    /// Appends a tuple.
    pub fn tuple(out: &mut Vec<u8>, t: &[Datum]) {
        out.extend_from_slice(&(t.len() as i16).to_be_bytes());
        for d in t {
            match d {
                Datum::Null => out.push(b'n'),
                Datum::UnchangedToast => out.push(b'u'),
                Datum::Text(s) => {
                    out.push(b't');
                    out.extend_from_slice(&(s.len() as i32).to_be_bytes());
                    out.extend_from_slice(s.as_bytes());
                }
                Datum::Binary(b) => {
                    out.push(b'b');
                    out.extend_from_slice(&(b.len() as i32).to_be_bytes());
                    out.extend_from_slice(b);
                }
            }
        }
    }

    /// A message's bytes.
    pub fn message(m: &Message) -> Vec<u8> {
        let mut out = Vec::new();
        match m {
            Message::Begin {
                final_lsn,
                commit_time,
                xid,
            } => {
                out.push(b'B');
                out.extend_from_slice(&final_lsn.to_be_bytes());
                out.extend_from_slice(&commit_time.to_be_bytes());
                out.extend_from_slice(&xid.to_be_bytes());
            }
            Message::Commit {
                flags,
                commit_lsn,
                end_lsn,
                commit_time,
            } => {
                out.push(b'C');
                out.push(*flags);
                out.extend_from_slice(&commit_lsn.to_be_bytes());
                out.extend_from_slice(&end_lsn.to_be_bytes());
                out.extend_from_slice(&commit_time.to_be_bytes());
            }
            Message::Origin { lsn, name } => {
                out.push(b'O');
                out.extend_from_slice(&lsn.to_be_bytes());
                string(&mut out, name);
            }
            Message::Relation(rel) => {
                out.push(b'R');
                out.extend_from_slice(&rel.id.to_be_bytes());
                string(&mut out, &rel.namespace);
                string(&mut out, &rel.name);
                out.push(rel.replica_identity);
                out.extend_from_slice(&(rel.columns.len() as i16).to_be_bytes());
                for c in &rel.columns {
                    out.push(u8::from(c.key));
                    string(&mut out, &c.name);
                    out.extend_from_slice(&c.type_oid.to_be_bytes());
                    out.extend_from_slice(&c.type_modifier.to_be_bytes());
                }
            }
            Message::Type {
                oid,
                namespace,
                name,
            } => {
                out.push(b'Y');
                out.extend_from_slice(&oid.to_be_bytes());
                string(&mut out, namespace);
                string(&mut out, name);
            }
            Message::Insert { relation, new } => {
                out.push(b'I');
                out.extend_from_slice(&relation.to_be_bytes());
                out.push(b'N');
                tuple(&mut out, new);
            }
            Message::Update { relation, old, new } => {
                out.push(b'U');
                out.extend_from_slice(&relation.to_be_bytes());
                if let Some((kind, t)) = old {
                    out.push(if *kind == OldKind::Key { b'K' } else { b'O' });
                    tuple(&mut out, t);
                }
                out.push(b'N');
                tuple(&mut out, new);
            }
            Message::Delete { relation, old } => {
                out.push(b'D');
                out.extend_from_slice(&relation.to_be_bytes());
                out.push(if old.0 == OldKind::Key { b'K' } else { b'O' });
                tuple(&mut out, &old.1);
            }
            Message::Truncate { options, relations } => {
                out.push(b'T');
                out.extend_from_slice(&(relations.len() as i32).to_be_bytes());
                out.push(*options);
                for r in relations {
                    out.extend_from_slice(&r.to_be_bytes());
                }
            }
            Message::Message {
                transactional,
                lsn,
                prefix,
                content,
            } => {
                out.push(b'M');
                out.push(u8::from(*transactional));
                out.extend_from_slice(&lsn.to_be_bytes());
                string(&mut out, prefix);
                out.extend_from_slice(&(content.len() as i32).to_be_bytes());
                out.extend_from_slice(content);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(m: Message) {
        let bytes = encode::message(&m);
        assert_eq!(decode(&bytes), Ok(Some(m.clone())), "{m:?}");
        // Every strict prefix is a truncation error, never a panic.
        for cut in 1..bytes.len() {
            assert!(decode(&bytes[..cut]).is_err(), "prefix {cut} of {m:?}");
        }
    }

    #[test]
    fn every_message_roundtrips() {
        roundtrip(Message::Begin {
            final_lsn: 0x16B_3748,
            commit_time: 817_000_000_000_000,
            xid: 734,
        });
        roundtrip(Message::Commit {
            flags: 0,
            commit_lsn: 0x16B_3748,
            end_lsn: 0x16B_3778,
            commit_time: 817_000_000_000_000,
        });
        roundtrip(Message::Origin {
            lsn: 7,
            name: "upstream".into(),
        });
        roundtrip(Message::Relation(Relation {
            id: 16_385,
            namespace: "public".into(),
            name: "orders".into(),
            replica_identity: b'd',
            columns: vec![
                Column {
                    name: "id".into(),
                    type_oid: 23,
                    type_modifier: -1,
                    key: true,
                },
                Column {
                    name: "note".into(),
                    type_oid: 25,
                    type_modifier: -1,
                    key: false,
                },
            ],
        }));
        roundtrip(Message::Type {
            oid: 16_400,
            namespace: "public".into(),
            name: "mood".into(),
        });
        roundtrip(Message::Insert {
            relation: 16_385,
            new: vec![Datum::Text("1".into()), Datum::Null],
        });
        roundtrip(Message::Update {
            relation: 16_385,
            old: Some((OldKind::Full, vec![Datum::Text("1".into()), Datum::Null])),
            new: vec![Datum::Text("1".into()), Datum::UnchangedToast],
        });
        roundtrip(Message::Update {
            relation: 16_385,
            old: None,
            new: vec![Datum::Text("ü".into()), Datum::Binary(vec![0, 1])],
        });
        roundtrip(Message::Delete {
            relation: 16_385,
            old: (OldKind::Key, vec![Datum::Text("1".into()), Datum::Null]),
        });
        roundtrip(Message::Truncate {
            options: 3,
            relations: vec![16_385, 16_390],
        });
        roundtrip(Message::Message {
            transactional: true,
            lsn: 9,
            prefix: "p".into(),
            content: b"hello".to_vec(),
        });
    }

    #[test]
    fn unknown_and_malformed_messages() {
        assert_eq!(decode(b"S\0\0\0\x01"), Ok(None), "stream start is skipped");
        assert!(decode(b"").is_err());
        assert!(decode(b"I\0\0\0\x01X").is_err(), "insert without N");
        assert!(decode(b"D\0\0\0\x01N\0\0").is_err(), "delete without K/O");
        let mut bad = vec![b'I', 0, 0, 0, 1, b'N', 0, 1, b't'];
        bad.extend_from_slice(&2i32.to_be_bytes());
        bad.extend_from_slice(&[0xff, 0xfe]);
        assert!(decode(&bad).is_err(), "invalid UTF-8");
    }
}

#[cfg(test)]
/// Messages written byte by byte from the manual, independent of `encode`.
mod byte_layout {
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
            decode(&begin).unwrap().unwrap(),
            Message::Begin {
                final_lsn: 0x1_0000_0010,
                commit_time: 42,
                xid: 777
            }
        );
        let commit = W::default().u8(b'C').u8(0).u64(10).u64(20).u64(42).0;
        assert_eq!(
            decode(&commit).unwrap().unwrap(),
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
        let Message::Relation(rel) = decode(&msg).unwrap().unwrap() else {
            panic!("not a relation")
        };
        assert_eq!(rel.id, 16384);
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
            decode(&msg).unwrap().unwrap(),
            Message::Insert {
                relation: 5,
                new: vec![
                    Datum::Text("1".into()),
                    Datum::Null,
                    Datum::Text("héllo".into())
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
            decode(&plain).unwrap().unwrap(),
            Message::Update {
                relation: 5,
                old: None,
                new: vec![Datum::Text("1".into()), Datum::UnchangedToast]
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
            decode(&full).unwrap().unwrap(),
            Message::Update {
                relation: 5,
                old: Some((OldKind::Full, vec![Datum::Text("old".into())])),
                new: vec![Datum::Text("new".into())]
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
            decode(&key).unwrap().unwrap(),
            Message::Update {
                old: Some((OldKind::Key, _)),
                ..
            }
        ));
    }

    #[test]
    fn delete_and_truncate() {
        let delete = W::default().u8(b'D').u32(9).u8(b'K').i16(1).text("3").0;
        assert_eq!(
            decode(&delete).unwrap().unwrap(),
            Message::Delete {
                relation: 9,
                old: (OldKind::Key, vec![Datum::Text("3".into())])
            }
        );
        let truncate = W::default().u8(b'T').u32(2).u8(1).u32(9).u32(10).0;
        assert_eq!(
            decode(&truncate).unwrap().unwrap(),
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
            decode(&msg).unwrap().unwrap(),
            Message::Message {
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
        assert_eq!(decode(b"Z").unwrap(), None, "unknown kinds are skipped");
        let short = W::default().u8(b'B').u64(1).0;
        assert!(decode(&short)
            .unwrap_err()
            .to_string()
            .contains("begin time"));
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
