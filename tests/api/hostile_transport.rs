//! The transport against a hostile client, with frames built by hand: memory
//! stays bounded by `limits.max_frame_bytes` whatever a frame header
//! declares, every breach of RFC 6455 gets the close frame the RFC asks for
//! (1002, 1007, 1009) before the connection closes, and only well-formed
//! HTTP/1.1 upgrades are upgraded.

use crate::helpers::*;
use crate::transport::{read_head, upgrade_request};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// `limits.max_frame_bytes` by default.
const LIMIT: usize = 65_536;

const MASK: [u8; 4] = [0x5a, 0x0f, 0xc3, 0x81];

/// A client frame's header: `first` holds FIN, RSV and opcode bits.
fn header(first: u8, len: u64, masked: bool) -> Vec<u8> {
    let mask_bit = if masked { 0x80 } else { 0 };
    let mut out = vec![first];
    match len {
        0..=125 => out.push(mask_bit | len as u8),
        126..=0xffff => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&len.to_be_bytes());
        }
    }
    if masked {
        out.extend_from_slice(&MASK);
    }
    out
}

/// A whole masked client frame.
fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = header(first, payload.len() as u64, true);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
    out
}

/// A text message in two fragments, cut at `cut`.
fn two_fragments(text: &[u8], cut: usize) -> Vec<u8> {
    let mut wire = frame(0x01, &text[..cut]);
    wire.extend(frame(0x80, &text[cut..]));
    wire
}

/// Reads server frames until one (first byte, payload) is the one wanted.
async fn until_frame(tcp: &mut TcpStream, wanted: impl Fn(u8, &[u8]) -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (first, payload) = tokio::time::timeout_at(deadline, read_frame(tcp))
            .await
            .expect("the frame in time")
            .expect("the connection stays open");
        if wanted(first, &payload) {
            return;
        }
    }
}

/// An upgraded connection (the 101 read, nothing after it).
async fn upgraded(app: &TestApp) -> TcpStream {
    let mut tcp = TcpStream::connect(app.addr).await.unwrap();
    tcp.write_all(upgrade_request(app, "/ws?user=hostile").as_bytes())
        .await
        .unwrap();
    let head = tokio::time::timeout(WAIT, read_head(&mut tcp))
        .await
        .expect("a handshake answer in time");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    tcp
}

/// One server frame: its first byte and its payload (servers do not mask).
async fn read_frame(tcp: &mut (impl AsyncRead + Unpin)) -> std::io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 2];
    tcp.read_exact(&mut head).await?;
    let len = match head[1] & 0x7f {
        126 => u64::from(tcp.read_u16().await?),
        127 => tcp.read_u64().await?,
        len => u64::from(len),
    };
    assert!(len <= 1 << 20, "a server frame this hub never sends");
    let mut payload = vec![0; len as usize];
    tcp.read_exact(&mut payload).await?;
    Ok((head[0], payload))
}

/// How the server ended the connection: the code of its close frame (after
/// which it must close the TCP connection too), or `None` when it dropped
/// the connection without one.
async fn close_code(tcp: &mut TcpStream) -> Option<u16> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let read = tokio::time::timeout_at(deadline, read_frame(tcp))
            .await
            .expect("the server closes in time");
        let Ok((first, payload)) = read else {
            return None;
        };
        if first & 0x0f == 0x8 {
            assert!(payload.len() >= 2, "a close frame with a code");
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            let mut rest = Vec::new();
            let end = tokio::time::timeout_at(deadline, tcp.read_to_end(&mut rest)).await;
            assert!(end.is_ok(), "the connection closes after the close frame");
            return Some(code);
        }
        // `welcome`, pings: the session's own frames before the close.
    }
}

#[tokio::test]
async fn a_frame_declaring_2_gb_is_refused_on_its_header_and_memory_stays_bounded() {
    let app = TestApp::spawn().await;
    let pid = app.pid();
    let before = rss_kib(pid);
    let tcp = upgraded(&app).await;
    let (mut rx, mut tx) = tcp.into_split();
    // The header declares 2 GB; then the client streams (at most 256 MB)
    // as fast as the hub takes it, until the hub closes.
    let writer = tokio::spawn(async move {
        let mut sent = 0usize;
        if tx.write_all(&header(0x81, 2 << 30, true)).await.is_err() {
            return sent;
        }
        let chunk = vec![b'x'; 64 * 1024];
        for _ in 0..4096 {
            if tx.write_all(&chunk).await.is_err() {
                break;
            }
            sent += chunk.len();
        }
        sent
    });
    // Read until the close frame, while the writer streams.
    let code = tokio::time::timeout(WAIT, async {
        loop {
            let (first, payload) = read_frame(&mut rx).await.ok()?;
            if first & 0x0f == 0x8 {
                return payload.get(..2).map(|c| u16::from_be_bytes([c[0], c[1]]));
            }
        }
    })
    .await;
    let during = rss_kib(pid);
    writer.abort();
    let grown_mib = during.saturating_sub(before) / 1024;
    eprintln!("hub RSS {before} KiB before, {during} KiB after the oversized frame");
    assert_eq!(
        code,
        Ok(Some(1009)),
        "1009 on the header alone (hub RSS grew by {grown_mib} MiB)"
    );
    assert!(
        grown_mib < 16,
        "memory bounded by the frame limit: RSS grew by {grown_mib} MiB"
    );
}

#[tokio::test]
async fn frames_and_fragmented_messages_over_the_limit_are_refused_before_their_payload() {
    let app = TestApp::spawn().await;
    // One byte over the limit, payload never sent: 1009 comes on the header.
    let mut tcp = upgraded(&app).await;
    let over = header(0x81, LIMIT as u64 + 1, true);
    tcp.write_all(&over).await.unwrap();
    assert_eq!(close_code(&mut tcp).await, Some(1009));
    // A fragmented message whose running total passes the limit: refused on
    // the header of the fragment that passes it.
    let mut tcp = upgraded(&app).await;
    let mut wire = frame(0x01, &vec![b' '; LIMIT - 1000]);
    wire.extend(header(0x00, 1001, true));
    tcp.write_all(&wire).await.unwrap();
    assert_eq!(close_code(&mut tcp).await, Some(1009));
    // Exactly the limit, in fragments, is a message.
    let mut tcp = upgraded(&app).await;
    let ping = br#"{"type":"ping","ref":"whole"}"#;
    let mut message = ping.to_vec();
    message.resize(LIMIT, b' ');
    tcp.write_all(&two_fragments(&message, LIMIT / 2))
        .await
        .unwrap();
    until_frame(&mut tcp, |_, payload| {
        payload.windows(7).any(|w| w == b"\"whole\"")
    })
    .await;
}

#[tokio::test]
async fn invalid_utf8_split_across_fragments_closes_with_1007() {
    let app = TestApp::spawn().await;
    // 0xCE starts a two-byte character; 0x28 cannot continue it.
    let mut tcp = upgraded(&app).await;
    let mut wire = frame(0x01, b"{\"type\":\"ping\",\"ref\":\"\xce");
    wire.extend(frame(0x80, b"\x28\"}"));
    tcp.write_all(&wire).await.unwrap();
    assert_eq!(close_code(&mut tcp).await, Some(1007));
    // A single frame too.
    let mut tcp = upgraded(&app).await;
    tcp.write_all(&frame(0x81, b"\"\xff\"")).await.unwrap();
    assert_eq!(close_code(&mut tcp).await, Some(1007));
    // A valid character split across fragments is fine.
    let mut tcp = upgraded(&app).await;
    let text = "{\"type\":\"ping\",\"ref\":\"\u{e9}t\u{e9}\"}".as_bytes();
    // unwrap: the text has an é.
    let cut = text.iter().position(|&b| b == 0xc3).unwrap() + 1;
    tcp.write_all(&two_fragments(text, cut)).await.unwrap();
    until_frame(&mut tcp, |_, payload| {
        String::from_utf8_lossy(payload).contains("\"\u{e9}t\u{e9}\"")
    })
    .await;
}

#[tokio::test]
async fn every_protocol_error_gets_a_close_frame_before_the_connection_closes() {
    let app = TestApp::spawn().await;
    let close = |payload: &[u8]| frame(0x88, payload);
    let mut cases: Vec<(String, Vec<u8>, u16)> = vec![
        ("unmasked frame".into(), header(0x81, 0, false), 1002),
        ("RSV1 set".into(), frame(0xc1, b"{}"), 1002),
        ("RSV2 set".into(), frame(0xa1, b"{}"), 1002),
        ("reserved opcode 3".into(), frame(0x83, b""), 1002),
        ("reserved opcode 0xB".into(), frame(0x8b, b""), 1002),
        ("ping of 126 bytes".into(), frame(0x89, &[0; 126]), 1002),
        ("fragmented ping".into(), frame(0x09, b""), 1002),
        ("stray continuation".into(), frame(0x80, b"{}"), 1002),
        (
            "text inside a fragmented message".into(),
            [frame(0x01, b"{"), frame(0x81, b"{}")].concat(),
            1002,
        ),
        ("close of one byte".into(), close(b"\x03"), 1002),
        (
            "close reason not UTF-8".into(),
            close(b"\x03\xe8\xc3\x28"),
            1007,
        ),
    ];
    for code in [0u16, 999, 1004, 1005, 1006, 1015, 1100, 2999] {
        cases.push((
            format!("close code {code}"),
            close(&code.to_be_bytes()),
            1002,
        ));
    }
    for (name, wire, expected) in cases {
        let mut tcp = upgraded(&app).await;
        tcp.write_all(&wire).await.unwrap();
        assert_eq!(close_code(&mut tcp).await, Some(expected), "{name}");
    }
    // A valid close is answered with a close frame (1005: no code in it).
    let mut tcp = upgraded(&app).await;
    tcp.write_all(&close(&3000u16.to_be_bytes())).await.unwrap();
    until_frame(&mut tcp, |first, _| first & 0x0f == 0x8).await;
}

/// Sends `request` raw and returns the response head.
async fn raw_response(app: &TestApp, request: &str) -> String {
    let mut tcp = TcpStream::connect(app.addr).await.unwrap();
    tcp.write_all(request.as_bytes()).await.unwrap();
    tokio::time::timeout(WAIT, read_head(&mut tcp))
        .await
        .expect("an answer in time")
}

#[tokio::test]
async fn only_a_bodiless_http_1_1_request_is_upgraded() {
    let app = TestApp::spawn().await;
    let request = upgrade_request(&app, "/ws?user=old");
    let http10 = request.replacen("HTTP/1.1", "HTTP/1.0", 1);
    let head = raw_response(&app, &http10).await;
    assert!(head.contains(" 400 "), "HTTP/1.0: {head}");
    let with_body =
        request.replacen("\r\n\r\n", "\r\nContent-Length: 6\r\n\r\n", 1) + "\u{81}\u{0}abcd";
    let head = raw_response(&app, &with_body).await;
    assert!(head.starts_with("HTTP/1.1 400"), "a body: {head}");
    let chunked =
        request.replacen("\r\n\r\n", "\r\nTransfer-Encoding: chunked\r\n\r\n", 1) + "0\r\n\r\n";
    let head = raw_response(&app, &chunked).await;
    assert!(head.starts_with("HTTP/1.1 400"), "chunked: {head}");
    // An empty body is no body.
    let empty = request.replacen("\r\n\r\n", "\r\nContent-Length: 0\r\n\r\n", 1);
    let head = raw_response(&app, &empty).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
}

#[tokio::test]
async fn an_expectation_other_than_100_continue_is_refused_with_417() {
    let app = TestApp::spawn().await;
    let post = format!(
        "POST /api/rooms/expect/messages HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {API_KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: 10\r\nExpect: bogus\r\n\r\n",
        app.addr
    );
    let head = raw_response(&app, &post).await;
    assert!(head.starts_with("HTTP/1.1 417"), "{head}");
    let upgrade =
        upgrade_request(&app, "/ws?user=e").replacen("\r\n\r\n", "\r\nExpect: bogus\r\n\r\n", 1);
    let head = raw_response(&app, &upgrade).await;
    assert!(head.starts_with("HTTP/1.1 417"), "{head}");
}

/// actix-http answers `100 Continue` itself (this held on main already).
#[tokio::test]
async fn a_post_with_expect_100_continue_gets_100_then_its_answer() {
    let app = TestApp::spawn().await;
    let body = r#"{"data":{"text":"after 100"}}"#;
    let mut tcp = TcpStream::connect(app.addr).await.unwrap();
    let head = format!(
        "POST /api/rooms/expect/messages HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {API_KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        app.addr,
        body.len()
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    // The body is sent only once the hub asked for it.
    let interim = tokio::time::timeout(WAIT, read_head(&mut tcp))
        .await
        .expect("100 Continue before the body");
    assert!(interim.starts_with("HTTP/1.1 100"), "{interim}");
    tcp.write_all(body.as_bytes()).await.unwrap();
    let response = tokio::time::timeout(WAIT, read_head(&mut tcp))
        .await
        .expect("the answer");
    assert!(response.starts_with("HTTP/1.1 201"), "{response}");
}
