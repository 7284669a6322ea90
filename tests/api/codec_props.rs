//! Property tests of the client-frame decoder: any input yields a frame or a
//! typed error (never a panic), and well-formed frames decode to what was sent.

use proptest::prelude::*;
use roomhub::protocol::{decode, ClientFrame, ErrorCode};
use serde_json::json;

fn room() -> impl Strategy<Value = String> {
    "[A-Za-z0-9._:-]{1,128}"
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn any_bytes_give_a_frame_or_a_typed_error(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let text = String::from_utf8_lossy(&bytes);
        if let Err(e) = decode(&text) {
            prop_assert!(matches!(e.code, ErrorCode::InvalidJson | ErrorCode::BadRequest | ErrorCode::UnknownType));
            prop_assert!(!e.message.is_empty());
        }
    }

    #[test]
    fn any_json_object_gives_a_frame_or_a_typed_error(
        kind in prop_oneof![Just("join"), Just("publish"), Just("history"), Just("typing"), Just("direct"), Just("x"), Just("")],
        fields in proptest::collection::hash_map("[a-z]{1,8}", any::<i64>().prop_map(|n| json!(n)), 0..6),
    ) {
        let mut object = serde_json::Map::new();
        object.insert("type".into(), json!(kind));
        for (k, v) in fields {
            object.insert(k, v);
        }
        let text = serde_json::Value::Object(object).to_string();
        match decode(&text) {
            Ok(_) => {}
            Err(e) => prop_assert!(matches!(e.code, ErrorCode::BadRequest | ErrorCode::UnknownType)),
        }
    }

    #[test]
    fn publishes_round_trip(room in room(), text in ".{0,200}", key in "[a-z0-9]{1,64}", reference in "[a-z0-9]{0,64}") {
        let frame = json!({"type": "publish", "room": room, "data": {"text": text}, "key": key, "ref": reference});
        let request = decode(&frame.to_string()).unwrap();
        prop_assert_eq!(request.reference.as_deref(), Some(reference.as_str()));
        match request.frame {
            ClientFrame::Publish { room: r, data, key: k } => {
                prop_assert_eq!(r.as_str(), room.as_str());
                let data: serde_json::Value = serde_json::from_str(data.get()).unwrap();
                prop_assert_eq!(data, json!({"text": text}));
                prop_assert_eq!(k.as_deref(), Some(key.as_str()));
            }
            other => prop_assert!(false, "{:?}", other),
        }
    }

    #[test]
    fn joins_round_trip(room in room(), epoch in any::<u64>(), offset in any::<u64>(), history in 0usize..=200) {
        let frame = json!({"type": "join", "room": room, "since": {"epoch": epoch, "offset": offset}, "history": history});
        match decode(&frame.to_string()).unwrap().frame {
            ClientFrame::Join { room: r, since, history: h } => {
                prop_assert_eq!(r.as_str(), room.as_str());
                let since = since.unwrap();
                prop_assert_eq!((since.epoch, since.offset), (epoch, offset));
                prop_assert_eq!(h, Some(history));
            }
            other => prop_assert!(false, "{:?}", other),
        }
    }
}
