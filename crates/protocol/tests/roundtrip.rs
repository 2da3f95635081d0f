//! Property tests of the codec: every valid packet survives encode → decode, whole and split
//! at any byte, and arbitrary bytes never make the decoder panic.

use bulwark_protocol::codec::{decode, encode, encoded_len, DecodeLimits};
use bulwark_protocol::fuzzing::check_decode;
use bulwark_protocol::{
    ConnAck, Connect, ConnectReturnCode, LastWill, Packet, ProtocolLevel, Publish, QoS, SubAck,
    Subscribe, SubscribeReturnCode, TopicFilter, TopicName, Unsubscribe,
};
use bytes::{BufMut, Bytes, BytesMut};
use proptest::prelude::*;

const LIMITS: DecodeLimits = DecodeLimits {
    max_packet_size: 1 << 20,
};

fn qos() -> impl Strategy<Value = QoS> {
    prop_oneof![
        Just(QoS::AtMostOnce),
        Just(QoS::AtLeastOnce),
        Just(QoS::ExactlyOnce)
    ]
}

fn pkid() -> impl Strategy<Value = u16> {
    1..=u16::MAX
}

/// Any UTF-8 string without U+0000, including multi-byte characters.
fn mqtt_string() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z0-9_-]{0,12}",
        any::<String>().prop_map(|s| s.replace('\0', "")),
    ]
}

fn bytes(max: usize) -> impl Strategy<Value = Bytes> {
    prop::collection::vec(any::<u8>(), 0..max).prop_map(Bytes::from)
}

fn level() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[a-z0-9]{0,6}",
        1 => Just("$SYS".to_string()),
        1 => "[^\\x00/+#]{0,6}",
    ]
}

fn topic_name() -> impl Strategy<Value = TopicName> {
    prop::collection::vec(level(), 1..5)
        .prop_map(|levels| levels.join("/"))
        .prop_filter("topic names are not empty", |t| !t.is_empty())
        .prop_map(|t| TopicName::new(t).expect("generated a valid topic name"))
}

fn topic_filter() -> impl Strategy<Value = TopicFilter> {
    let level = prop_oneof![3 => level(), 1 => Just("+".to_string())];
    (prop::collection::vec(level, 1..5), any::<bool>())
        .prop_map(|(mut levels, hash)| {
            if hash {
                levels.push("#".into());
            }
            levels.join("/")
        })
        .prop_filter("filters are not empty", |f| !f.is_empty())
        .prop_map(|f| TopicFilter::new(f).expect("generated a valid topic filter"))
}

fn connect() -> impl Strategy<Value = Packet> {
    let will = (topic_name(), bytes(32), qos(), any::<bool>()).prop_map(
        |(topic, payload, qos, retain)| LastWill {
            topic,
            payload,
            qos,
            retain,
        },
    );
    let credentials = prop::option::of((mqtt_string(), prop::option::of(bytes(32))));
    (
        any::<bool>(),
        any::<u16>(),
        mqtt_string(),
        prop::option::of(will),
        credentials,
    )
        .prop_map(
            |(clean_session, keep_alive, client_id, will, credentials)| {
                let (username, password) = match credentials {
                    Some((user, password)) => (Some(user), password),
                    None => (None, None),
                };
                Packet::Connect(Connect {
                    protocol: ProtocolLevel::V311,
                    clean_session: clean_session || client_id.is_empty(),
                    keep_alive,
                    client_id,
                    will,
                    username,
                    password,
                })
            },
        )
}

fn connack() -> impl Strategy<Value = Packet> {
    let code = prop_oneof![
        Just(ConnectReturnCode::Accepted),
        Just(ConnectReturnCode::UnacceptableProtocolVersion),
        Just(ConnectReturnCode::IdentifierRejected),
        Just(ConnectReturnCode::ServerUnavailable),
        Just(ConnectReturnCode::BadUsernameOrPassword),
        Just(ConnectReturnCode::NotAuthorized),
    ];
    (any::<bool>(), code).prop_map(|(session_present, code)| {
        Packet::ConnAck(ConnAck {
            session_present: session_present && code == ConnectReturnCode::Accepted,
            code,
        })
    })
}

fn publish() -> impl Strategy<Value = Packet> {
    (
        qos(),
        any::<bool>(),
        any::<bool>(),
        topic_name(),
        pkid(),
        bytes(64),
    )
        .prop_map(|(qos, dup, retain, topic, pkid, payload)| {
            let qos0 = qos == QoS::AtMostOnce;
            Packet::Publish(Publish {
                dup: dup && !qos0,
                qos,
                retain,
                topic,
                pkid: if qos0 { None } else { Some(pkid) },
                payload,
            })
        })
}

fn subscribe() -> impl Strategy<Value = Packet> {
    (pkid(), prop::collection::vec((topic_filter(), qos()), 1..5))
        .prop_map(|(pkid, filters)| Packet::Subscribe(Subscribe { pkid, filters }))
}

fn suback() -> impl Strategy<Value = Packet> {
    let code = prop_oneof![
        qos().prop_map(SubscribeReturnCode::Success),
        Just(SubscribeReturnCode::Failure)
    ];
    (pkid(), prop::collection::vec(code, 1..8))
        .prop_map(|(pkid, return_codes)| Packet::SubAck(SubAck { pkid, return_codes }))
}

fn unsubscribe() -> impl Strategy<Value = Packet> {
    (pkid(), prop::collection::vec(topic_filter(), 1..5))
        .prop_map(|(pkid, filters)| Packet::Unsubscribe(Unsubscribe { pkid, filters }))
}

/// Any valid packet of the fourteen kinds.
fn any_packet() -> impl Strategy<Value = Packet> {
    prop_oneof![
        connect(),
        connack(),
        publish(),
        pkid().prop_map(Packet::PubAck),
        pkid().prop_map(Packet::PubRec),
        pkid().prop_map(Packet::PubRel),
        pkid().prop_map(Packet::PubComp),
        subscribe(),
        suback(),
        unsubscribe(),
        pkid().prop_map(Packet::UnsubAck),
        Just(Packet::PingReq),
        Just(Packet::PingResp),
        Just(Packet::Disconnect),
    ]
}

fn encode_all(packets: &[Packet]) -> Vec<u8> {
    let mut buf = BytesMut::new();
    for p in packets {
        let before = buf.len();
        encode(p, &mut buf).expect("valid packets encode");
        assert_eq!(buf.len() - before, encoded_len(p));
    }
    buf.to_vec()
}

fn decode_available(buf: &mut BytesMut, out: &mut Vec<Packet>) {
    while let Some(p) = decode(buf, &LIMITS).expect("a prefix of valid packets never fails") {
        out.push(p);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn encode_then_decode_is_identity(packet in any_packet()) {
        let wire = encode_all(std::slice::from_ref(&packet));
        let mut buf = BytesMut::from(&wire[..]);
        prop_assert_eq!(decode(&mut buf, &LIMITS), Ok(Some(packet)));
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn stream_fed_byte_by_byte(packets in prop::collection::vec(any_packet(), 1..6)) {
        let wire = encode_all(&packets);
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for byte in wire {
            buf.put_u8(byte);
            decode_available(&mut buf, &mut got);
        }
        prop_assert!(buf.is_empty());
        prop_assert_eq!(got, packets);
    }

    #[test]
    fn stream_split_at_every_position(packets in prop::collection::vec(any_packet(), 1..4)) {
        let wire = encode_all(&packets);
        for split in 0..=wire.len() {
            let mut buf = BytesMut::from(&wire[..split]);
            let mut got = Vec::new();
            decode_available(&mut buf, &mut got);
            buf.extend_from_slice(&wire[split..]);
            decode_available(&mut buf, &mut got);
            prop_assert!(buf.is_empty());
            prop_assert_eq!(&got, &packets, "split at {}", split);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..256)) {
        check_decode(&data);
    }

    /// Random bodies behind a plausible fixed header reach deeper into the parsers.
    #[test]
    fn random_bodies_never_panic(
        first in prop::sample::select(vec![
            0x10u8, 0x20, 0x30, 0x31, 0x32, 0x3a, 0x3d, 0x40, 0x50, 0x62, 0x70, 0x82, 0x90,
            0xa2, 0xb0, 0xc0, 0xd0, 0xe0,
        ]),
        body in prop::collection::vec(any::<u8>(), 0..128),
    ) {
        let mut wire = BytesMut::new();
        wire.put_u8(first);
        let mut len = body.len();
        loop {
            let byte = (len % 128) as u8;
            len /= 128;
            wire.put_u8(if len > 0 { byte | 0x80 } else { byte });
            if len == 0 {
                break;
            }
        }
        wire.put_slice(&body);
        check_decode(&wire);
    }

    /// Valid packets with one byte changed: mostly errors, never a panic, and anything that
    /// still decodes round-trips.
    #[test]
    fn mutated_packets_never_panic(
        packet in any_packet(),
        at in any::<prop::sample::Index>(),
        xor in 1..=u8::MAX,
    ) {
        let mut wire = encode_all(&[packet]);
        let i = at.index(wire.len());
        wire[i] ^= xor;
        check_decode(&wire);
    }
}
