//! A small async HTTP/1.1 client for the fleet simulator: one keep-alive
//! connection per simulated host (over TLS, as agents connect, or plain),
//! bound to a chosen 127.0.0.x source address so ten thousand hosts do not
//! run out of ephemeral ports.

use std::io;
use std::net::{IpAddr, SocketAddr};

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpSocket;

/// A byte stream: TCP, or TLS over it.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// One keep-alive connection.
pub struct Conn {
    stream: BufReader<Box<dyn Stream>>,
    host: String,
}

/// TLS as agents speak it: the coordinator's CA and nothing else.
pub fn tls_connector(cas: &[rustls::pki_types::CertificateDer<'_>]) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for ca in cas {
        roots
            .add(ca.clone().into_owned())
            .expect("a CA certificate");
    }
    let config = rustls::ClientConfig::builder_with_provider(turnout_rt::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the defaults")
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
}

impl Conn {
    /// Connects to `server` from `source` (port chosen by the kernel), over
    /// TLS when `tls` is given (the certificate must name 127.0.0.1).
    pub async fn connect(
        source: IpAddr,
        server: SocketAddr,
        tls: Option<&tokio_rustls::TlsConnector>,
    ) -> io::Result<Conn> {
        let socket = TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(source, 0))?;
        let stream = socket.connect(server).await?;
        stream.set_nodelay(true)?;
        let stream: Box<dyn Stream> = match tls {
            None => Box::new(stream),
            Some(connector) => {
                let name = rustls::pki_types::ServerName::IpAddress(server.ip().into());
                Box::new(connector.connect(name, stream).await?)
            }
        };
        Ok(Conn {
            stream: BufReader::new(stream),
            host: server.to_string(),
        })
    }

    /// Sends one request and reads the whole answer: (status, body).
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        authorization: Option<&str>,
        body: &[u8],
    ) -> io::Result<(u16, Vec<u8>)> {
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\n",
            self.host,
            body.len()
        );
        if let Some(auth) = authorization {
            head.push_str(&format!("Authorization: {auth}\r\n"));
        }
        if !body.is_empty() {
            head.push_str("Content-Type: application/json\r\n");
        }
        head.push_str("\r\n");
        let stream = self.stream.get_mut();
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body).await?;
        // TLS buffers what is written until flushed.
        stream.flush().await?;
        let mut line = String::new();
        if self.stream.read_line(&mut line).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the server closed the connection",
            ));
        }
        let status = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| io::Error::other(format!("bad status line {line:?}")))?;
        let (mut length, mut chunked) = (0usize, false);
        loop {
            line.clear();
            self.stream.read_line(&mut line).await?;
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                match name.to_ascii_lowercase().as_str() {
                    "content-length" => length = value.trim().parse().unwrap_or(0),
                    "transfer-encoding" => chunked = value.to_ascii_lowercase().contains("chunked"),
                    _ => {}
                }
            }
        }
        let mut body = Vec::new();
        if chunked {
            loop {
                line.clear();
                self.stream.read_line(&mut line).await?;
                let size = usize::from_str_radix(line.trim(), 16)
                    .map_err(|_| io::Error::other("bad chunk size"))?;
                let mut chunk = vec![0; size + 2];
                self.stream.read_exact(&mut chunk).await?;
                if size == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..size]);
            }
        } else {
            body.resize(length, 0);
            self.stream.read_exact(&mut body).await?;
        }
        Ok((status, body))
    }
}
