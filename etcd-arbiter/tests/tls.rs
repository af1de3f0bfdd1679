//! The etcd arbiter over TLS against a real etcd that requires client certificates
//! (`--client-cert-auth`): certificates made at test time with the `openssl` command.
//! With the CA and this node's certificate it holds leases; without a client certificate,
//! or trusting another CA, it gets a clear error naming the endpoint.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use remus_etcd_arbiter::{EtcdArbiter, EtcdSettings, EtcdTls};
use remus_ha::witness::LeaseArbiter;
use support::Etcd;

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("the openssl command (Debian package openssl)");
    assert!(out.status.success(), "openssl {args:?}: {out:?}");
}

/// A CA (`NAME-ca.pem`/`.key`) and, signed by it, a certificate `NAME-LEAF.pem` per leaf
/// with the given extensions.
fn pki(dir: &Path, name: &str, leaves: &[(&str, &str)]) {
    let ca = format!("{name}-ca");
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={ca}"),
            "-keyout",
            &format!("{ca}.key"),
            "-out",
            &format!("{ca}.pem"),
        ],
    );
    for (leaf, ext) in leaves {
        let base = format!("{name}-{leaf}");
        let extfile = dir.join(format!("{base}.ext"));
        std::fs::write(&extfile, ext).unwrap();
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                &format!("/CN={leaf}"),
                "-keyout",
                &format!("{base}.key"),
                "-out",
                &format!("{base}.csr"),
            ],
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-days",
                "2",
                "-in",
                &format!("{base}.csr"),
                "-CA",
                &format!("{ca}.pem"),
                "-CAkey",
                &format!("{ca}.key"),
                "-CAcreateserial",
                "-extfile",
                extfile.to_str().unwrap(),
                "-out",
                &format!("{base}.pem"),
            ],
        );
    }
}

fn read(dir: &Path, f: &str) -> Vec<u8> {
    std::fs::read(dir.join(f)).unwrap()
}

#[tokio::test]
async fn tls_with_client_certificates() {
    let certs = tempfile::tempdir().unwrap();
    let d = certs.path();
    pki(
        d,
        "site",
        &[
            (
                "etcd",
                "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n",
            ),
            ("alpha", "extendedKeyUsage=clientAuth\n"),
        ],
    );
    pki(d, "other", &[("alpha", "extendedKeyUsage=clientAuth\n")]);
    let p = |f: &str| d.join(f).display().to_string();
    let etcd = Etcd::start_tls(&[
        format!("--cert-file={}", p("site-etcd.pem")),
        format!("--key-file={}", p("site-etcd.key")),
        format!("--trusted-ca-file={}", p("site-ca.pem")),
        "--client-cert-auth".to_string(),
    ])
    .await;
    let settings = |tls: EtcdTls| {
        let mut s = EtcdSettings::new(
            "alpha",
            vec![etcd.endpoint.clone()],
            "/remus",
            Duration::from_secs(2),
        );
        s.tls = Some(tls);
        s
    };
    // The right CA and this node's certificate: leases work.
    let a = EtcdArbiter::connect(settings(EtcdTls {
        ca_pem: Some(read(d, "site-ca.pem")),
        client: Some((read(d, "site-alpha.pem"), read(d, "site-alpha.key"))),
    }))
    .await
    .unwrap();
    a.check_domains(&["web".into()]).await.unwrap();
    let l = a.acquire("web").await.unwrap();
    assert!(a.release(&l).await.unwrap());

    // Refused, each with the endpoint named: no client certificate; a certificate of
    // another CA; a server certificate this node's CA did not sign.
    let cases = [
        (
            "no client certificate",
            EtcdTls {
                ca_pem: Some(read(d, "site-ca.pem")),
                client: None,
            },
        ),
        (
            "a client certificate of another CA",
            EtcdTls {
                ca_pem: Some(read(d, "site-ca.pem")),
                client: Some((read(d, "other-alpha.pem"), read(d, "other-alpha.key"))),
            },
        ),
        (
            "trusting another CA",
            EtcdTls {
                ca_pem: Some(read(d, "other-ca.pem")),
                client: Some((read(d, "site-alpha.pem"), read(d, "site-alpha.key"))),
            },
        ),
    ];
    for (what, tls) in cases {
        let e = match EtcdArbiter::connect(settings(tls)).await {
            Err(e) => e,
            Ok(a) => match a.check_domains(&["web".into()]).await {
                Err(e) => e,
                Ok(()) => panic!("{what}: accepted"),
            },
        };
        let msg = e.to_string();
        println!("{what}: {msg}");
        assert!(msg.contains(&etcd.endpoint), "{what}: {msg}");
    }
}
