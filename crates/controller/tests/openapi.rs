//! The checked-in OpenAPI document must match the code. The CLI's client is
//! generated from the checked-in file, so drift would mean a client that
//! does not speak this server's API.

use std::path::PathBuf;

#[test]
fn checked_in_openapi_document_matches_the_code() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../openapi/stratus.json");
    let generated = stratus_controller::http::openapi::document_string();
    if std::env::var_os("STRATUS_BLESS").is_some() {
        std::fs::write(&path, &generated).expect("writing openapi/stratus.json");
        return;
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        checked_in == generated,
        "openapi/stratus.json is out of date with the code.\n\
         If the API change is intended, run:\n  STRATUS_BLESS=1 cargo test -p stratus-controller --test openapi\n\
         and commit the new document (the CLI client is generated from it)."
    );
}

#[test]
fn every_reference_resolves() {
    // A type named by path in an annotation (`crate::views::X`) produces a
    // reference to a schema that does not exist; the client generator
    // rejects such a document, so catch it here with a clear message.
    let doc = stratus_controller::http::openapi::document_json();
    let text = doc.to_string();
    let schemas = doc["components"]["schemas"].as_object().expect("schemas");
    for part in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
        let name = part.split('"').next().unwrap_or("");
        assert!(
            schemas.contains_key(name),
            "$ref to missing schema {name:?}"
        );
    }
}

#[test]
fn every_operation_outside_healthz_requires_a_token() {
    let doc = stratus_controller::http::openapi::document_json();
    let paths = doc["paths"].as_object().expect("paths");
    let mut checked = 0;
    for (path, item) in paths {
        for (method, op) in item.as_object().expect("path item") {
            let secured = op
                .get("security")
                .and_then(|s| s.as_array())
                .is_some_and(|s| !s.is_empty());
            if path == "/healthz" {
                assert!(!secured, "/healthz must be open");
            } else if path == "/v1/agent/enroll" {
                // Authenticated by the one-time enrollment token in the body.
            } else {
                assert!(secured, "{method} {path} must declare bearer security");
            }
            checked += 1;
        }
    }
    assert!(checked >= 30, "only {checked} operations found");
}
