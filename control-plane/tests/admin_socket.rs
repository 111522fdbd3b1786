//! The real admin socket: the server, not the client, decides who is asking (`SO_PEERCRED`), and
//! a peer that is neither the data directory's owner nor root is refused even when the socket's
//! file permissions would let it connect.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use gaffer_control::admin::{self, AdminRequest, AdminResponse};
use gaffer_control::store::sled_store::SledStore;
use gaffer_control::store::{Role, Store};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_socket_names_the_peer_by_uid_and_refuses_strangers() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let store: Arc<dyn Store> = Arc::new(SledStore::open(&dir.path().join("store"))?);
    let fp = gaffer_certs::FleetCa::generate("test")?.fingerprint();
    let socket = dir.path().join("control.sock");
    let server = admin::serve_admin_socket(&socket, store.clone(), fp, None).await?;

    // The owner (this process) is served, and recorded by its uid and name, never by $USER.
    let phc = admin::hash_password("a long enough test password")?;
    let req = AdminRequest::AddUser { name: "alice".into(), role: Role::Operator, password_phc: phc };
    match admin::request(&socket, &req).await? {
        Some(AdminResponse::UserAdded(u)) => assert_eq!((u.name.as_str(), u.role), ("alice", Role::Operator)),
        other => bail!("unexpected answer: {other:?}"),
    }
    let expected = admin::local_actor().to_string();
    assert!(expected.starts_with(&format!("uid {} ", nix::unistd::getuid())), "{expected}");
    let audit = store.list_audit(10)?;
    assert_eq!(
        audit.iter().map(|a| (a.action.as_str(), a.who.as_str())).collect::<Vec<_>>(),
        [("user_add", expected.as_str())]
    );

    // Another uid: only testable as root (to run a client as someone else).
    let setpriv = std::path::Path::new("/usr/bin/setpriv");
    let python = std::path::Path::new("/usr/bin/python3");
    if !nix::unistd::getuid().is_root() || !setpriv.exists() || !python.exists() {
        eprintln!("skipping the foreign-uid half: needs root, /usr/bin/setpriv and /usr/bin/python3");
        server.abort();
        return Ok(());
    }
    // Loosen the file permissions so that only the uid check stands in the way.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666))?;
    let script = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
s.sendall(b'{"action":"list_users"}\n')
s.shutdown(socket.SHUT_WR)
print(s.makefile().readline())
"#;
    let out = Command::new(setpriv)
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(python)
        .args(["-c", script])
        .arg(&socket)
        .output()
        .context("running a client as uid 65534")?;
    let answer = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "client failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(answer.contains("\"result\":\"error\"") && answer.contains("uid 65534 may not use"), "{answer}");
    assert!(!answer.contains("alice"), "a stranger learned the users: {answer}");
    assert_eq!(store.list_audit(10)?.len(), 1, "the refused request wrote nothing");
    server.abort();
    Ok(())
}
