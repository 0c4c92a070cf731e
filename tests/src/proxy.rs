//! A proxy between one agent and the coordinator that can cut the host off,
//! stall the coordinator's answers, and, over TLS, see them: it ends the
//! agent's TLS with a certificate of its own and opens its own to the
//! coordinator. With the coordinator's certificate it is a faithful relay
//! (the agent trusts it, as it trusts the coordinator); with a certificate
//! of another CA it is the man in the middle an agent must refuse.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How the proxy speaks TLS: the certificate it shows agents, and the CA
/// it checks the coordinator against.
#[derive(Clone)]
pub struct ProxyTls {
    acceptor: tokio_rustls::TlsAcceptor,
    connector: tokio_rustls::TlsConnector,
}

fn read_pem(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

impl ProxyTls {
    /// Shows agents the certificate chain and key at `cert`/`key`, and
    /// trusts the coordinator by the CA certificates at `ca`.
    pub fn new(cert: &Path, key: &Path, ca: &Path) -> ProxyTls {
        use rustls::pki_types::PrivateKeyDer;
        use rustls::pki_types::pem::PemObject;
        let provider = turnout_rt::tls::provider();
        let chain = turnout_rt::tls::certificates_from_pem(&read_pem(cert)).unwrap();
        let key = PrivateKeyDer::from_pem_slice(&read_pem(key)).unwrap();
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for ca in turnout_rt::tls::certificates_from_pem(&read_pem(ca)).unwrap() {
            roots.add(ca).unwrap();
        }
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        ProxyTls {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
            connector: tokio_rustls::TlsConnector::from(Arc::new(client)),
        }
    }

    /// A relay the agent trusts: the coordinator's own TLS files in `state_dir/tls`.
    pub fn relay(coordinator_state: &Path) -> ProxyTls {
        let tls = coordinator_state.join("tls");
        ProxyTls::new(
            &tls.join("server.pem"),
            &tls.join("server.key"),
            &tls.join("ca.pem"),
        )
    }
}

struct Shared {
    /// How new connections speak TLS (None: plain TCP).
    tls: Mutex<Option<ProxyTls>>,
    cut: AtomicBool,
    hold: AtomicBool,
    held: Mutex<Vec<u8>>,
    /// Bumped by `cut`: connections end when it changes.
    generation: tokio::sync::watch::Sender<u64>,
}

/// A proxy on 127.0.0.1 in front of the coordinator.
pub struct Proxy {
    /// The port agents behind it use.
    pub port: u16,
    shared: Arc<Shared>,
}

impl Proxy {
    /// Forwards 127.0.0.1:(new port) to 127.0.0.1:`target`, as TLS on both
    /// sides when `tls` is given, else as plain TCP.
    pub fn start(target: u16, tls: Option<ProxyTls>) -> Proxy {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Shared {
            tls: Mutex::new(tls),
            cut: AtomicBool::new(false),
            hold: AtomicBool::new(false),
            held: Mutex::new(Vec::new()),
            generation: tokio::sync::watch::channel(0).0,
        });
        let serving = Arc::clone(&shared);
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = TcpListener::from_std(listener).unwrap();
                loop {
                    let Ok((client, _)) = listener.accept().await else {
                        continue;
                    };
                    if serving.cut.load(Ordering::SeqCst) {
                        continue; // dropped: refused before any answer
                    }
                    let tls = serving.tls.lock().unwrap().clone();
                    tokio::spawn(relay(Arc::clone(&serving), client, target, tls));
                }
            });
        });
        Proxy { port, shared }
    }

    /// Holds every answer from the coordinator (a stalled link), keeping
    /// what arrives; [`Proxy::release`] delivers it.
    pub fn hold(&self) {
        self.shared.held.lock().unwrap().clear();
        self.shared.hold.store(true, Ordering::SeqCst);
    }

    /// What the coordinator answered while held, as text (decrypted, over TLS).
    pub fn held(&self) -> String {
        String::from_utf8_lossy(&self.shared.held.lock().unwrap()).into_owned()
    }

    /// Delivers what was held, and lets answers through again.
    pub fn release(&self) {
        self.shared.hold.store(false, Ordering::SeqCst);
    }

    /// Cuts every open connection and refuses new ones.
    pub fn cut(&self) {
        self.shared.cut.store(true, Ordering::SeqCst);
        self.shared.generation.send_modify(|g| *g += 1);
    }

    /// From now on shows agents `tls` (another CA's certificate: a man in
    /// the middle), ending the connections open now so they come back to it.
    pub fn impersonate(&self, tls: ProxyTls) {
        *self.shared.tls.lock().unwrap() = Some(tls);
        self.shared.generation.send_modify(|g| *g += 1);
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        self.shared.cut.store(false, Ordering::SeqCst);
    }
}

async fn relay(shared: Arc<Shared>, client: TcpStream, target: u16, tls: Option<ProxyTls>) {
    let mut cut = shared.generation.subscribe();
    let Ok(server) = TcpStream::connect(("127.0.0.1", target)).await else {
        return;
    };
    let work = async {
        match tls {
            None => pump(&shared, client, server).await,
            Some(tls) => {
                let Ok(client) = tls.acceptor.accept(client).await else {
                    return;
                };
                let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
                let Ok(server) = tls.connector.connect(name, server).await else {
                    return;
                };
                pump(&shared, client, server).await;
            }
        }
    };
    tokio::select! {
        () = work => {}
        _ = cut.changed() => {}
    }
}

/// Copies both ways; the coordinator's bytes wait while `hold` is set.
async fn pump<C, S>(shared: &Shared, client: C, server: S)
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let (mut server_read, mut server_write) = tokio::io::split(server);
    let up = async {
        let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
        let _ = server_write.shutdown().await;
    };
    let down = async {
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            let n = match server_read.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if shared.hold.load(Ordering::SeqCst) {
                shared.held.lock().unwrap().extend_from_slice(&buffer[..n]);
                while shared.hold.load(Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            if client_write.write_all(&buffer[..n]).await.is_err() {
                break;
            }
        }
        let _ = client_write.shutdown().await;
    };
    tokio::join!(up, down);
}
