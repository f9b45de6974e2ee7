//! Verification against requests botocore 1.44.8 really signed (recorded by a local HTTP
//! server; see `fixtures/`), and signing that botocore's verifier would accept.

use super::*;
use serde_json::Value;

struct Recorded {
    method: String,
    path: String,
    query: String,
    headers: Vec<(String, String)>,
    body: String,
}

fn fixtures() -> (String, Vec<Recorded>) {
    let data: Value =
        serde_json::from_str(include_str!("../fixtures/botocore-1.44.8.json")).unwrap();
    let requests = data["requests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| Recorded {
            method: r["method"].as_str().unwrap().to_owned(),
            path: r["path"].as_str().unwrap().to_owned(),
            query: r["query"].as_str().unwrap().to_owned(),
            headers: r["headers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|h| {
                    (
                        h[0].as_str().unwrap().to_owned(),
                        h[1].as_str().unwrap().to_owned(),
                    )
                })
                .collect(),
            body: r["body"].as_str().unwrap().to_owned(),
        })
        .collect();
    (data["secret"].as_str().unwrap().to_owned(), requests)
}

fn header<'a>(r: &'a Recorded, name: &str) -> &'a str {
    r.headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
        .unwrap()
}

fn as_request(r: &Recorded) -> Request<'_> {
    Request {
        method: &r.method,
        path: &r.path,
        query: &r.query,
        headers: &r.headers,
        body: r.body.as_bytes(),
    }
}

#[test]
fn botocore_signatures_verify() {
    let (secret, requests) = fixtures();
    assert!(
        requests.len() >= 6,
        "fixtures cover batch JSON, tag paths, query strings and sts"
    );
    for r in &requests {
        let auth = parse_authorization(header(r, "authorization")).unwrap();
        assert_eq!(auth.access_key_id, "AKIAMUSTERFIXTURE01");
        verify(&as_request(r), &auth, header(r, "x-amz-date"), &secret)
            .unwrap_or_else(|e| panic!("{} {}?{}: {e}", r.method, r.path, r.query));
    }
}

#[test]
fn any_change_breaks_the_signature() {
    let (secret, requests) = fixtures();
    for r in &requests {
        let auth = parse_authorization(header(r, "authorization")).unwrap();
        let date = header(r, "x-amz-date");
        let mut body = r.body.clone().into_bytes();
        body.push(b' ');
        let tampered_body = Request {
            body: &body,
            ..as_request(r)
        };
        assert_eq!(
            verify(&tampered_body, &auth, date, &secret),
            Err(AuthError::SignatureMismatch)
        );
        let tampered_path = format!("{}x", r.path);
        let other_path = Request {
            path: &tampered_path,
            ..as_request(r)
        };
        assert_eq!(
            verify(&other_path, &auth, date, &secret),
            Err(AuthError::SignatureMismatch)
        );
        assert_eq!(
            verify(&as_request(r), &auth, "20261126T000000Z", &secret),
            Err(AuthError::SignatureMismatch)
        );
        assert_eq!(
            verify(&as_request(r), &auth, date, "wrong"),
            Err(AuthError::SignatureMismatch)
        );
        let mut other_region = auth.clone();
        other_region.region = "eu-west-1".into();
        assert_eq!(
            verify(&as_request(r), &other_region, date, &secret),
            Err(AuthError::SignatureMismatch)
        );
    }
}

#[test]
fn signing_reproduces_botocore() {
    let (secret, requests) = fixtures();
    for r in &requests {
        let auth = parse_authorization(header(r, "authorization")).unwrap();
        // Only the headers botocore signed go into our signer, as they were sent.
        let signed: Vec<(String, String)> = r
            .headers
            .iter()
            .filter(|(n, _)| {
                let n = n.to_ascii_lowercase();
                auth.signed_headers.contains(&n) && n != "x-amz-date"
            })
            .map(|(n, v)| (n.to_ascii_lowercase(), v.clone()))
            .collect();
        let req = Request {
            headers: &signed,
            ..as_request(r)
        };
        let added = sign(
            &req,
            &auth.access_key_id,
            &secret,
            &auth.region,
            &auth.service,
            header(r, "x-amz-date"),
        );
        let ours = &added.iter().find(|(n, _)| n == "authorization").unwrap().1;
        assert_eq!(ours, header(r, "authorization"), "{} {}", r.method, r.path);
    }
}

#[test]
fn malformed_headers_are_refused() {
    for bad in [
        "",
        "AWS4-HMAC-SHA1 Credential=a/20260101/us-east-1/batch/aws4_request, SignedHeaders=host, Signature=00",
        "AWS4-HMAC-SHA256 Credential=a/20260101/us-east-1/batch, SignedHeaders=host, Signature=00",
        "AWS4-HMAC-SHA256 Credential=a/20260101/us-east-1/batch/aws4_request, SignedHeaders=x-amz-date, Signature=0000000000000000000000000000000000000000000000000000000000000000",
        "AWS4-HMAC-SHA256 Credential=a/20260101/us-east-1/batch/aws4_request, SignedHeaders=host, Signature=zz",
    ] {
        assert!(parse_authorization(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn amz_dates_round_trip() {
    assert_eq!(parse_amz_date("19700101T000000Z"), Some(0));
    assert_eq!(parse_amz_date("20261126T012345Z"), Some(1_795_656_225));
    for t in [0u64, 951_782_400, 1_795_656_225, 4_102_444_799] {
        assert_eq!(parse_amz_date(&format_amz_date(t)), Some(t));
    }
    assert_eq!(parse_amz_date("20261326T012345Z"), None);
    assert_eq!(parse_amz_date("2026-11-26T01:23:45Z"), None);
}

const VALID: &str = "AWS4-HMAC-SHA256 Credential=AKID/20261126/us-east-1/batch/aws4_request, SignedHeaders=host;x-amz-date, Signature=0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
    /// Whatever a client puts in `Authorization` and `X-Amz-Date`: an answer, never a panic.
    #[test]
    fn any_header_is_parsed_or_refused_without_a_panic(header in ".{0,300}", date in ".{0,20}") {
        let _ = parse_authorization(&header);
        let _ = parse_amz_date(&date);
    }

    /// A valid header with bytes changed, cut or inserted anywhere, then verified against a
    /// request of random parts.
    #[test]
    fn a_mangled_header_is_refused_or_verified_without_a_panic(
        at in 0usize..VALID.len(),
        cut in 0usize..8,
        insert in proptest::collection::vec(proptest::prelude::any::<char>(), 0..6),
        path in ".{0,40}",
        query in ".{0,40}",
        body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64),
        header_value in ".{0,40}",
    ) {
        let mut mangled: String = VALID.chars().take(at).collect();
        mangled.extend(insert);
        mangled.extend(VALID.chars().skip(at + cut));
        if let Ok(auth) = parse_authorization(&mangled) {
            let headers = vec![
                ("host".to_owned(), header_value.clone()),
                ("x-amz-date".to_owned(), header_value),
            ];
            let req = Request { method: "POST", path: &path, query: &query, headers: &headers, body: &body };
            let _ = verify(&req, &auth, "20261126T000000Z", "secret");
        }
    }
}
