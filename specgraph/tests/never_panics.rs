//! Whatever the input, reading, building and rendering never panic, and
//! every line is either taken or counted as skipped.

use proptest::prelude::*;
use specgraph::model::{build, Input};
use specgraph::parse::read_stream;
use specgraph::render::page;

/// Lines near the real ones: real kinds and fields with odd values, cut
/// short, or junk.
fn line() -> impl Strategy<Value = String> {
    let kind = prop_oneof![
        Just("started"),
        Just("joined"),
        Just("committed"),
        Just("aborted"),
        Just("acked"),
        Just("refused"),
        Just("forged"),
        Just("lease-expired"),
        Just("port-up"),
        Just("port-down"),
        Just("lagged"),
        Just("speculate"),
        Just("commit"),
        Just("abort"),
        Just("join"),
        Just("rollback"),
        Just("budget"),
        Just(""),
        Just("peer-up"),
    ];
    let id = prop_oneof![
        (any::<u32>(), any::<u32>()).prop_map(|(v, s)| format!("\"{v}:{s}\"")),
        (0u32..3, 0u32..4).prop_map(|(v, s)| format!("\"{v}:{s}\"")),
        Just("\"\"".to_string()),
        Just("null".to_string()),
        Just("\"1:\"".to_string()),
        Just("12".to_string()),
        "\"[^\"\\\\]{0,12}\"".prop_map(|s| s),
    ];
    let num = prop_oneof![
        any::<u64>().prop_map(|n| n.to_string()),
        (0u64..4).prop_map(|n| n.to_string()),
        Just("-1".to_string()),
        Just("1.5".to_string()),
        Just("\"3\"".to_string()),
        Just("18446744073709551616".to_string()),
    ];
    let event = (
        kind,
        proptest::option::of(id),
        proptest::option::of(num.clone()),
        proptest::option::of(num.clone()),
        proptest::option::of(num),
        any::<bool>(),
    )
        .prop_map(|(k, id, port, us, depth, by)| {
            let mut f = vec![format!("\"event\":\"{k}\"")];
            if let Some(id) = id {
                f.push(format!("\"id\":{id}"));
            }
            if let Some(p) = port {
                f.push(format!("\"port\":{p}"));
                f.push(format!("\"dropped\":{p}"));
            }
            if let Some(u) = us {
                f.push(format!("\"us\":{u}"));
            }
            if let Some(d) = depth {
                f.push(format!("\"depth\":{d}"));
            }
            if by {
                f.push("\"by\":\"network\"".into());
            }
            format!("{{{}}}", f.join(","))
        });
    prop_oneof![
        4 => event.clone(),
        1 => (event, any::<usize>()).prop_map(|(e, cut)| {
            String::from_utf8_lossy(&e.as_bytes()[..cut % (e.len() + 1)]).into_owned()
        }),
        1 => any::<String>(),
        1 => Just("{\"ok\":false,\"error\":\"x\"}".to_string()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn near_real_streams_never_panic(streams in proptest::collection::vec(proptest::collection::vec(line(), 0..40), 1..4)) {
        let mut inputs = Vec::new();
        for (i, lines) in streams.iter().enumerate() {
            let text = lines.join("\n");
            let parsed = read_stream(text.as_bytes()).expect("reading a slice");
            let nonblank = text.split('\n').filter(|l| !l.trim().is_empty()).count() as u64;
            prop_assert_eq!(parsed.records.len() as u64 + parsed.malformed, nonblank);
            inputs.push(Input { name: format!("b{i}"), parsed });
        }
        let g = build(&inputs);
        let html = page(&g, "t");
        prop_assert!(html.ends_with("</html>\n"));
    }

    #[test]
    fn any_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let parsed = read_stream(&bytes[..]).expect("reading a slice");
        let g = build(&[Input { name: "x".into(), parsed }]);
        let _ = page(&g, "t");
    }
}
