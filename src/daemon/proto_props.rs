//! Property tests of the control protocol's lines (outside input: any
//! local user writes them): request lines, cancel lines and answers, under
//! mutations of valid lines and deep nesting. Decoding is the two steps of
//! `control::decode` (a JSON value within serde_json's recursion limit,
//! then the typed request); the line itself is bounded by `control`
//! (64 KiB) and a stream's cancel buffer by `stream` (4 KiB).

use super::proto::{ClientLine, Op, Request, Response, VERSION};
use crate::stream::props::{apply, mutation};
use proptest::prelude::*;

/// What `control::decode` does with a line: a value, then a request.
fn decode(line: &[u8]) -> Result<Request, serde_json::Error> {
    let v: serde_json::Value = serde_json::from_str(&String::from_utf8_lossy(line))?;
    serde_json::from_value(v)
}

fn op() -> impl Strategy<Value = Op> {
    let s = ".{0,30}";
    prop_oneof![
        s.prop_map(|kind| Op::List { kind }),
        Just(Op::Tree),
        (s, proptest::option::of(s)).prop_map(|(name, size)| Op::Create { name, size }),
        (s, any::<bool>()).prop_map(|(target, recursive)| Op::Destroy { target, recursive }),
        (s, s, proptest::option::of(s)).prop_map(|(target, key, value)| Op::Label {
            target,
            key,
            value
        }),
        s.prop_map(|target| Op::Export(crate::service::ExportRequest { target })),
        proptest::option::of(s)
            .prop_map(|name| Op::Restore(crate::service::RestoreRequest { name })),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn request_lines_round_trip_and_mutations_are_clean(
        op in op(),
        ms in prop::collection::vec(mutation(), 1..4),
    ) {
        let line = serde_json::to_vec(&Request { v: VERSION, op }).unwrap();
        let back = decode(&line).unwrap();
        prop_assert_eq!(serde_json::to_vec(&back).unwrap(), line.clone());
        let _ = back.op.summary();
        let mut b = line;
        for m in &ms {
            apply(&mut b, m);
        }
        if let Ok(r) = decode(&b) {
            // Whatever decodes can be summarised for the log.
            let _ = (r.op.summary(), r.op.fds(), r.op.is_change());
        }
        let _ = serde_json::from_slice::<ClientLine>(&b);
        let _ = serde_json::from_slice::<Response>(&b);
    }
}

/// The longest line `control` takes, nested as deep as it goes: an error
/// (serde_json's recursion limit), not a stack overflow.
#[test]
fn deep_nesting_is_refused() {
    for open in [b'[', b'{'] {
        let mut line = br#"{"v":2,"op":"list","kind":"#.to_vec();
        line.resize(64 * 1024, open);
        assert!(decode(&line).is_err());
        assert!(serde_json::from_slice::<ClientLine>(&line).is_err());
        assert!(serde_json::from_slice::<Response>(&line).is_err());
    }
}
