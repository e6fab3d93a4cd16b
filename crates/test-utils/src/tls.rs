//! Certificates for the migration TLS tests, made with `openssl` (installed
//! by `scripts/setup-host.sh`): one copy for the driver's and the whole
//! stack's tests, so both exercise the same layout an operator sets up.

use std::path::Path;
use std::process::Command;

/// Makes a fresh CA and a server and a client certificate signed by it in
/// `dir` (which must exist), under the names QEMU's `tls-creds-x509` object
/// reads: `ca-cert.pem`, `server-cert.pem`, `server-key.pem`,
/// `client-cert.pem`, `client-key.pem` (plus the CA's key and the requests,
/// which QEMU ignores).
///
/// The server certificate names `127.0.0.1` and `localhost`: the source's
/// QEMU checks the destination's certificate against the address it
/// connects to, and the tests' hosts all listen on loopback. Every call
/// makes a new CA, so two directories made by two calls do not trust each
/// other: that is how a test shows QEMU really verifies its peer.
///
/// Panics with `openssl`'s own message when a step fails: a test without
/// certificates has nothing to test.
pub fn migration_tls_certificates(dir: &Path) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run openssl ({e}); run scripts/setup-host.sh, which installs it")
            });
        assert!(
            out.status.success(),
            "openssl {args:?} in {}: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=stratus test CA",
        "-keyout",
        "ca-key.pem",
        "-out",
        "ca-cert.pem",
    ]);
    for (who, ext) in [
        (
            "server",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
        ),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ] {
        let ext_file = dir.join(format!("{who}.ext"));
        std::fs::write(&ext_file, ext)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", ext_file.display()));
        run(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            &format!("/CN=127.0.0.1 {who}"),
            "-keyout",
            &format!("{who}-key.pem"),
            "-out",
            &format!("{who}.csr"),
        ]);
        run(&[
            "x509",
            "-req",
            "-in",
            &format!("{who}.csr"),
            "-CA",
            "ca-cert.pem",
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &format!("{who}.ext"),
            "-out",
            &format!("{who}-cert.pem"),
        ]);
    }
}
