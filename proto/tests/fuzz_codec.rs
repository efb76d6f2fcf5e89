//! Fuzzing the codec: arbitrary bytes, and mutations of real frames, decoded as every frame
//! type never panic, and never allocate more than the frame limit (an allocator that caps
//! the bytes a decode may take aborts the test if one tries).
//!
//! Runs `SESAME_FUZZ_CASES` cases per property (default 256). A failure prints the minimal
//! input and the file proptest saves it in (`fuzz_codec.proptest-regressions` beside this
//! one), which later runs replay first.
//!
//! Everything runs in one `#[test]`: the allocator cap is process-wide, so no other test
//! thread may allocate while a decode runs under it.

use std::alloc::System;

use cap::Cap;
use proptest::prelude::*;
use proptest::test_runner::{FileFailurePersistence, TestRunner};
use sesame_proto::codec::{self, FORMAT_VERSION, FRAME_BYTES_MAX, MAGIC};
use sesame_proto::{
    Command, CommandResult, Conflict, Op, Origin, Publish, Role, TokenRecord, Transaction, Tuple,
    Value,
};

#[global_allocator]
static ALLOCATOR: Cap<System> = Cap::new(System, usize::MAX);

/// Bytes a decode may allocate beyond [`FRAME_BYTES_MAX`]: the decoded value's own small
/// allocations and the error.
const DECODE_SLACK_BYTES: usize = 1 << 20;

fn runner() -> TestRunner {
    let cases = std::env::var("SESAME_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    TestRunner::new(ProptestConfig {
        cases,
        source_file: Some(file!()),
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        ..ProptestConfig::default()
    })
}

/// Runs one property, panicking with proptest's report (the minimal input) on failure.
fn check<S: Strategy>(name: &str, strategy: S, test: impl Fn(S::Value))
where
    S::Value: std::fmt::Debug,
{
    let result = runner().run(&strategy, |input| {
        test(input);
        Ok(())
    });
    if let Err(e) = result {
        panic!("{name}: {e}");
    }
}

/// Decodes `frame` as `T` with the allocator capped at the frame limit (plus slack) above
/// what is allocated now. Past the cap an allocation fails and the process aborts.
fn decode_capped<T: bincode::Decode<()>>(frame: &[u8]) -> Result<T, codec::CodecError> {
    ALLOCATOR
        .set_limit(ALLOCATOR.allocated() + FRAME_BYTES_MAX + DECODE_SLACK_BYTES)
        .expect("the cap is above what is allocated");
    let decoded = codec::decode::<T>(frame);
    ALLOCATOR
        .set_limit(usize::MAX)
        .expect("no limit is always allowed");
    decoded
}

/// Decodes the frame as every type that travels in frames.
fn decode_as_everything(frame: &[u8]) {
    // Results are dropped inside the cap's accounting too: nothing may panic.
    let _ = decode_capped::<Command>(frame);
    let _ = decode_capped::<CommandResult>(frame);
    let _ = decode_capped::<Transaction>(frame);
    let _ = decode_capped::<Tuple>(frame);
    let _ = decode_capped::<Value>(frame);
    let _ = decode_capped::<Op>(frame);
    let _ = decode_capped::<TokenRecord>(frame);
    let _ = decode_capped::<Publish>(frame);
    let _ = decode_capped::<Origin>(frame);
}

fn header() -> Vec<u8> {
    let mut h = MAGIC.to_vec();
    h.push(FORMAT_VERSION);
    h
}

/// Real frames of every command and result shape, to mutate.
fn samples() -> Vec<Vec<u8>> {
    let value = Value::from_json(serde_json::json!({
        "name": "Alice", "n": [1, 2.5, null, true], "pic": {"$bytes": "AAEC"}
    }))
    .expect("a valid JSON value");
    let tx = Transaction {
        site: "demo".into(),
        ops: vec![
            Op::Put {
                collection: "profiles".into(),
                key: "a/b".into(),
                value: value.clone(),
                if_version: Some(3),
            },
            Op::Delete {
                collection: "p".into(),
                key: "k".into(),
                if_version: None,
            },
        ],
        origin: Some(Origin {
            client_id: "phone".into(),
            seq: 9,
        }),
    };
    let commands = [
        Command::CreateSite {
            name: "demo".into(),
            created_at_ms: 1,
        },
        Command::PutToken(TokenRecord {
            hash: "ab".repeat(32),
            site: "demo".into(),
            role: Role::Editor,
            created_at_ms: 5,
            expires_at_ms: Some(10),
        }),
        Command::Txs(vec![tx.clone(), tx]),
        Command::Publish(Publish {
            site: "demo".into(),
            manifest: "cd".repeat(32),
            index: 4,
            files: 2,
            published_at_ms: 3,
            expected: None,
            rollback: true,
        }),
        Command::RevokeToken {
            site: "demo".into(),
            id: 3,
            revoked_at_ms: 7,
        },
        Command::DeleteSite {
            name: "demo".into(),
            deleted_at_ms: 8,
        },
    ];
    let results = [
        CommandResult::Txs(vec![
            CommandResult::Committed { index: 2 },
            CommandResult::Duplicate { index: 1 },
            CommandResult::StaleSeq { highest: 9 },
        ]),
        CommandResult::Conflict(Conflict {
            op: 0,
            collection: "p".into(),
            key: "k".into(),
            expected: 1,
            current: 2,
        }),
        CommandResult::RootMoved {
            current: Some("x".into()),
        },
    ];
    let mut frames: Vec<Vec<u8>> = commands.iter().map(codec::encode).collect();
    frames.extend(results.iter().map(codec::encode));
    frames.push(codec::encode(&value));
    frames
}

/// One change to a frame.
#[derive(Debug, Clone)]
enum Mutation {
    Flip {
        at: usize,
        bit: u8,
    },
    Set {
        at: usize,
        byte: u8,
    },
    Truncate {
        len: usize,
    },
    Insert {
        at: usize,
        bytes: Vec<u8>,
    },
    /// A varint claiming a huge length, where a length might be.
    HugeLength {
        at: usize,
        bytes: [u8; 9],
    },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Mutation::Flip { at, bit }),
        (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Mutation::Set { at, byte }),
        any::<usize>().prop_map(|len| Mutation::Truncate { len }),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        (any::<usize>(), any::<[u8; 8]>()).prop_map(|(at, tail)| {
            let mut bytes = [253u8; 9];
            bytes[1..].copy_from_slice(&tail);
            Mutation::HugeLength { at, bytes }
        }),
    ]
}

fn apply(frame: &mut Vec<u8>, m: &Mutation) {
    // Keep the header: past it is where decoding happens.
    let body = frame.len().saturating_sub(4).max(1);
    match m {
        Mutation::Flip { at, bit } => {
            let i = 4 + at % body;
            if let Some(b) = frame.get_mut(i) {
                *b ^= 1 << bit;
            }
        }
        Mutation::Set { at, byte } => {
            let i = 4 + at % body;
            if let Some(b) = frame.get_mut(i) {
                *b = *byte;
            }
        }
        Mutation::Truncate { len } => frame.truncate(4 + len % body),
        Mutation::Insert { at, bytes } => {
            let i = (4 + at % body).min(frame.len());
            frame.splice(i..i, bytes.iter().copied());
        }
        Mutation::HugeLength { at, bytes } => {
            let i = (4 + at % body).min(frame.len());
            let end = (i + bytes.len()).min(frame.len());
            frame.splice(i..end, bytes.iter().copied());
        }
    }
}

#[test]
fn decoding_never_panics_nor_allocates_past_the_frame_limit() {
    for frame in samples() {
        let ok = decode_capped::<Command>(&frame).is_ok()
            || decode_capped::<CommandResult>(&frame).is_ok()
            || decode_capped::<Value>(&frame).is_ok();
        assert!(ok, "a sample frame decodes as what it is");
    }
    check(
        "arbitrary bytes",
        prop::collection::vec(any::<u8>(), 0..2048),
        |bytes| decode_as_everything(&bytes),
    );
    check(
        "arbitrary bodies behind a valid header",
        prop::collection::vec(any::<u8>(), 0..2048),
        |body| {
            let mut frame = header();
            frame.extend_from_slice(&body);
            decode_as_everything(&frame);
        },
    );
    let frames = samples();
    check(
        "mutated frames",
        (any::<usize>(), prop::collection::vec(mutation(), 1..6)),
        |(which, mutations)| {
            let mut frame = frames[which % frames.len()].clone();
            for m in &mutations {
                apply(&mut frame, m);
            }
            decode_as_everything(&frame);
        },
    );
}
