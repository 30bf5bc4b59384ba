use bytes::{BufMut, Bytes, BytesMut};

use super::*;

// pgoutput messages as the walsender sends them (protocol v1).
fn begin(final_lsn: u64) -> Bytes {
    let mut b = BytesMut::new();
    b.put_u8(b'B');
    b.put_u64(final_lsn);
    b.put_i64(0);
    b.put_u32(7);
    b.freeze()
}

fn commit(commit_lsn: u64, end_lsn: u64) -> Bytes {
    let mut b = BytesMut::new();
    b.put_u8(b'C');
    b.put_u8(0);
    b.put_u64(commit_lsn);
    b.put_u64(end_lsn);
    b.put_i64(0);
    b.freeze()
}

fn relation(id: u32, columns: &[&str]) -> Bytes {
    let mut b = BytesMut::new();
    b.put_u8(b'R');
    b.put_u32(id);
    b.put_slice(b"public\0t\0");
    b.put_u8(b'd');
    b.put_i16(columns.len() as i16);
    for (i, c) in columns.iter().enumerate() {
        b.put_u8(u8::from(i == 0));
        b.put_slice(c.as_bytes());
        b.put_u8(0);
        b.put_u32(23);
        b.put_i32(-1);
    }
    b.freeze()
}

fn insert(id: u32, value: &str) -> Bytes {
    let mut b = BytesMut::new();
    b.put_u8(b'I');
    b.put_u32(id);
    b.put_u8(b'N');
    b.put_i16(1);
    b.put_u8(b't');
    b.put_i32(value.len() as i32);
    b.put_slice(value.as_bytes());
    b.freeze()
}

fn type_message() -> Bytes {
    let mut b = BytesMut::new();
    b.put_u8(b'Y');
    b.put_u32(16400);
    b.put_slice(b"public\0mood\0");
    b.freeze()
}

fn truncate(ids: &[u32]) -> Bytes {
    let mut b = BytesMut::new();
    b.put_u8(b'T');
    b.put_u32(ids.len() as u32);
    b.put_u8(0);
    for id in ids {
        b.put_u32(*id);
    }
    b.freeze()
}

fn feed(chunker: &mut Chunker, messages: Vec<Bytes>) -> Vec<Record> {
    messages.into_iter().filter_map(|m| chunker.push(m).unwrap()).collect()
}

#[test]
fn records_round_trip() {
    let record = Record {
        kind: RecordKind::Transaction,
        commit_lsn: Lsn(0x1_0000_0010),
        end_lsn: Lsn(0x1_0000_0040),
        chunk: 3,
        last: true,
        messages: vec![begin(5), insert(1, "x"), Bytes::new()],
    };
    let bytes = record.encode();
    assert_eq!(bytes.len(), record.encoded_len());
    assert_eq!(Record::decode(bytes).unwrap(), record);
    assert_eq!(Record::decode(Record::progress(Lsn(9)).encode()).unwrap(), Record::progress(Lsn(9)));
    assert_eq!(record.msg_id(0), "100000010.3");
    assert_eq!(record.msg_id(2), "100000010.3.g2");
    assert_eq!(Record::progress(Lsn(255)).msg_id(0), "pFF");
}

#[test]
fn malformed_records_are_errors() {
    assert!(Record::decode(Bytes::from_static(b"hello")).is_err());
    let mut bytes = BytesMut::from(&Record::progress(Lsn(1)).encode()[..]);
    bytes[4] = 9; // a future format
    assert!(Record::decode(bytes.freeze()).unwrap_err().0.contains("upgrade"));
    let mut bytes = BytesMut::from(&Record::progress(Lsn(1)).encode()[..]);
    bytes.put_u32(10);
    bytes.put_u8(1);
    assert!(Record::decode(bytes.freeze()).is_err());
}

#[test]
fn every_transaction_describes_its_tables_once() {
    let mut chunker = Chunker::new(1 << 20);
    // The walsender describes the table once per session.
    let first = feed(
        &mut chunker,
        vec![begin(100), type_message(), relation(1, &["id"]), insert(1, "1"), insert(1, "2"), commit(100, 120)],
    );
    let second = feed(&mut chunker, vec![begin(130), insert(1, "3"), commit(130, 150)]);
    assert_eq!(first.len(), 1);
    assert_eq!(
        first[0].messages,
        vec![begin(100), relation(1, &["id"]), insert(1, "1"), insert(1, "2"), commit(100, 120)]
    );
    assert_eq!((first[0].commit_lsn, first[0].end_lsn, first[0].last), (Lsn(100), Lsn(120), true));
    assert_eq!(second[0].messages, vec![begin(130), relation(1, &["id"]), insert(1, "3"), commit(130, 150)]);
    assert!(!chunker.in_transaction());
}

#[test]
fn a_changed_table_is_described_again_before_its_next_change() {
    let mut chunker = Chunker::new(1 << 20);
    let records = feed(
        &mut chunker,
        vec![
            begin(100),
            relation(1, &["id"]),
            insert(1, "1"),
            relation(1, &["id", "extra"]),
            insert(1, "2"),
            truncate(&[1]),
            commit(100, 120),
        ],
    );
    assert_eq!(
        records[0].messages,
        vec![
            begin(100),
            relation(1, &["id"]),
            insert(1, "1"),
            relation(1, &["id", "extra"]),
            insert(1, "2"),
            truncate(&[1]),
            commit(100, 120)
        ]
    );
}

#[test]
fn catalog_facts_travel_with_their_relation_message_and_lean_ones_with_its_copies() {
    let mut chunker = Chunker::new(1 << 20);
    let facts = |v: &'static [u8]| Bytes::from_static(v);
    assert!(chunker.set_facts(1, facts(b"F?"), facts(b"f?")).is_err(), "facts of a table never described");
    chunker.push(begin(100)).unwrap();
    chunker.push(relation(1, &["id"])).unwrap();
    chunker.set_facts(1, facts(b"F1"), facts(b"f1")).unwrap();
    chunker.push(insert(1, "1")).unwrap();
    // Newer facts (enum labels) for a table already described here: now,
    // before the next change; later copies carry the lean ones.
    chunker.set_facts(1, facts(b"F2"), facts(b"f2")).unwrap();
    chunker.push(insert(1, "2")).unwrap();
    let first = chunker.push(commit(100, 120)).unwrap().unwrap();
    let second = feed(&mut chunker, vec![begin(130), insert(1, "3"), commit(130, 150)]);
    assert_eq!(
        first.messages,
        vec![
            begin(100),
            relation(1, &["id"]),
            facts(b"F1"),
            insert(1, "1"),
            facts(b"F2"),
            insert(1, "2"),
            commit(100, 120)
        ]
    );
    assert_eq!(
        second[0].messages,
        vec![begin(130), relation(1, &["id"]), facts(b"f2"), insert(1, "3"), commit(130, 150)]
    );
    // A new description drops the facts about the old one.
    let third = feed(&mut chunker, vec![begin(160), relation(1, &["id", "x"]), insert(1, "4"), commit(160, 170)]);
    assert_eq!(third[0].messages, vec![begin(160), relation(1, &["id", "x"]), insert(1, "4"), commit(160, 170)]);
}

#[test]
fn records_without_facts_are_still_read() {
    let mut bytes = BytesMut::from(&Record::progress(Lsn(1)).encode()[..]);
    bytes[4] = 1;
    assert_eq!(Record::decode(bytes.freeze()).unwrap(), Record::progress(Lsn(1)));
}

#[test]
fn big_transactions_come_in_chunks() {
    let mut chunker = Chunker::new(100);
    let mut messages = vec![begin(100), relation(1, &["id"])];
    messages.extend((0..20).map(|i| insert(1, &format!("{i:020}"))));
    messages.push(commit(100, 999));
    let records = feed(&mut chunker, messages);
    assert!(records.len() > 3, "{} records", records.len());
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r.chunk, i as u32);
        assert_eq!(r.commit_lsn, Lsn(100));
        assert_eq!(r.last, i == records.len() - 1);
        assert!(r.encoded_len() < 200);
    }
    assert_eq!(records.last().unwrap().end_lsn, Lsn(999));
    let all: Vec<Bytes> = records.iter().flat_map(|r| r.messages.clone()).collect();
    assert_eq!(all.len(), 23, "Begin, the table description, 20 changes, Commit");
    assert_eq!(all[1], relation(1, &["id"]));
}

#[test]
fn chunker_refuses_what_it_cannot_carry() {
    let mut chunker = Chunker::new(100);
    assert!(chunker.push(insert(1, "x")).is_err(), "change outside a transaction");
    chunker.push(begin(1)).unwrap();
    assert!(chunker.push(insert(1, "x")).unwrap_err().0.contains("before its Relation"));
    assert!(chunker.push(begin(2)).is_err());
    assert!(chunker.push(Bytes::from_static(b"S\0\0\0\x01\x01")).is_err(), "streamed transactions");
}

fn txn(commit: u64, end: u64, chunk: u32, last: bool) -> Record {
    Record {
        kind: RecordKind::Transaction,
        commit_lsn: Lsn(commit),
        end_lsn: Lsn(if last { end } else { 0 }),
        chunk,
        last,
        messages: vec![],
    }
}

#[test]
fn sequencer_applies_each_transaction_once() {
    let mut s = Sequencer::new(Lsn(50));
    assert_eq!(s.next(&txn(10, 20, 0, true)).unwrap(), Action::Skip, "applied before the restart");
    assert_eq!(s.next(&txn(60, 70, 0, false)).unwrap(), Action::Feed);
    assert!(s.in_transaction());
    assert_eq!(s.next(&txn(60, 70, 0, false)).unwrap(), Action::Restart, "sent again from its start");
    assert_eq!(s.next(&txn(60, 70, 1, false)).unwrap(), Action::Feed);
    assert_eq!(s.next(&txn(60, 70, 1, false)).unwrap(), Action::Skip, "duplicate chunk");
    assert_eq!(s.next(&Record::progress(Lsn(65))).unwrap(), Action::Skip, "progress inside a transaction");
    assert_eq!(s.next(&txn(60, 70, 2, true)).unwrap(), Action::Feed);
    assert!(!s.in_transaction());
    assert_eq!(s.next(&txn(60, 70, 0, true)).unwrap(), Action::Skip, "duplicate transaction");
    assert_eq!(s.next(&txn(60, 70, 2, true)).unwrap(), Action::Skip, "stray chunk");
    assert_eq!(s.next(&Record::progress(Lsn(70))).unwrap(), Action::Skip, "not ahead");
    assert_eq!(s.next(&Record::progress(Lsn(90))).unwrap(), Action::Progress(Lsn(90)));
    assert_eq!(s.next(&txn(80, 85, 0, true)).unwrap(), Action::Skip, "committed before the progress mark");
    assert_eq!(s.next(&txn(95, 99, 0, false)).unwrap(), Action::Feed);
    assert!(s.next(&txn(95, 99, 3, true)).is_err(), "a lost chunk is an error");
}

fn copy(x: u64, chunk: u32, last: bool) -> Record {
    Record { kind: RecordKind::Copy, end_lsn: Lsn(if last { x } else { 0 }), ..txn(x, x, chunk, last) }
}

#[test]
fn table_copies_are_sequenced_like_transactions_at_their_point() {
    let mut s = Sequencer::new(Lsn(50));
    assert_eq!(s.next(&copy(40, 0, false)).unwrap(), Action::Skip, "a copy older than what is applied");
    assert_eq!(s.next(&copy(60, 0, false)).unwrap(), Action::Feed);
    assert_eq!(s.next(&copy(60, 1, false)).unwrap(), Action::Feed);
    // The publisher died in the middle of it: what comes next starts over.
    assert_eq!(s.next(&txn(70, 75, 0, true)).unwrap(), Action::Restart, "a cut-off copy is dropped");
    assert_eq!(s.next(&copy(80, 0, false)).unwrap(), Action::Feed);
    assert!(s.next(&copy(80, 2, true)).is_err(), "a lost chunk of a copy is an error");
    assert_eq!(s.next(&copy(80, 1, true)).unwrap(), Action::Feed);
    assert!(!s.in_transaction());
    // Everything before the point is applied with it.
    assert_eq!(s.next(&Record::progress(Lsn(80))).unwrap(), Action::Skip);
    assert_eq!(s.next(&txn(80, 90, 0, true)).unwrap(), Action::Feed);
}

#[test]
fn only_table_copies_carry_format_3() {
    let c = copy(0x10, 0, true).encode();
    assert_eq!(c[4], 3);
    assert_eq!(txn(1, 2, 0, true).encode()[4], 2);
    assert_eq!(Record::progress(Lsn(3)).encode()[4], 2);
    // A copy kind in an older format is not one.
    let mut bytes = BytesMut::from(&c[..]);
    bytes[4] = 2;
    assert!(Record::decode(bytes.freeze()).is_err());
}
