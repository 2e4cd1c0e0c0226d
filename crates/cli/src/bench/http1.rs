//! A minimal HTTP/1.1 client over one connection: the simulated nodes' side of hello, watch and heartbeat, cheap enough for 10,000 of them.

use super::*;

/// Read buffer of a simulated node's connection: an answer's head and a
/// small body fit.
const READ_BUFFER_BYTES: usize = 2048;
/// A refused answer is quoted in the error up to this many characters.
const ANSWER_SHOWN_CHARS_MAX: usize = 300;

/// One keep-alive HTTP/1.1 connection, about 2 KiB: enough to hold 10,000
/// simulated nodes' long-polls in one process.
pub(super) struct Http1 {
    pub(super) io: BufReader<TcpStream>,
    pub(super) host: String,
}

impl Http1 {
    pub(super) async fn connect(from: Ipv4Addr, to: SocketAddr) -> std::io::Result<Http1> {
        let socket = TcpSocket::new_v4()?;
        socket.bind(SocketAddr::from((from, 0)))?;
        let stream = socket.connect(to).await?;
        stream.set_nodelay(true)?;
        Ok(Http1 {
            io: BufReader::with_capacity(READ_BUFFER_BYTES, stream),
            host: to.to_string(),
        })
    }

    pub(super) async fn call(
        &mut self,
        method: &str,
        path: &str,
        bearer: Option<&str>,
        body: &[u8],
    ) -> anyhow::Result<(u16, Vec<u8>)> {
        let mut head = format!("{method} {path} HTTP/1.1\r\nhost: {}\r\n", self.host);
        if let Some(b) = bearer {
            let _ = write!(head, "authorization: Bearer {b}\r\n");
        }
        if method != "GET" {
            let _ = write!(
                head,
                "content-type: application/json\r\ncontent-length: {}\r\n",
                body.len()
            );
        }
        head.push_str("\r\n");
        let mut out = head.into_bytes();
        out.extend_from_slice(body);
        self.io.get_mut().write_all(&out).await?;

        let mut budget = 0usize;
        let mut line = Vec::new();
        self.line(&mut line, &mut budget).await?;
        let status: u16 = std::str::from_utf8(&line)
            .ok()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("bad status line {:?}", String::from_utf8_lossy(&line)))?;
        let mut length: Option<usize> = None;
        let mut chunked = false;
        loop {
            self.line(&mut line, &mut budget).await?;
            if line.is_empty() {
                break;
            }
            let text = String::from_utf8_lossy(&line);
            if let Some((name, value)) = text.split_once(':') {
                let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
                if name == "content-length" {
                    length = Some(value.parse().context("bad content-length")?);
                } else if name == "transfer-encoding" && value.eq_ignore_ascii_case("chunked") {
                    chunked = true;
                }
            }
        }
        let mut body = Vec::new();
        if chunked {
            loop {
                self.line(&mut line, &mut budget).await?;
                let size = usize::from_str_radix(
                    String::from_utf8_lossy(&line)
                        .split(';')
                        .next()
                        .unwrap_or("")
                        .trim(),
                    16,
                )
                .context("bad chunk size")?;
                if size == 0 {
                    // Trailers, then the empty line.
                    loop {
                        self.line(&mut line, &mut budget).await?;
                        if line.is_empty() {
                            break;
                        }
                    }
                    break;
                }
                ensure!(body.len() + size <= BODY_BYTES_MAX, "answer too large");
                let at = body.len();
                body.resize(at + size, 0);
                self.io.read_exact(&mut body[at..]).await?;
                self.line(&mut line, &mut budget).await?;
            }
        } else {
            let n = length.unwrap_or(0);
            ensure!(n <= BODY_BYTES_MAX, "answer too large");
            body.resize(n, 0);
            self.io.read_exact(&mut body).await?;
        }
        Ok((status, body))
    }

    /// One header line without its CRLF; the header budget bounds them all.
    pub(super) async fn line(
        &mut self,
        buf: &mut Vec<u8>,
        budget: &mut usize,
    ) -> anyhow::Result<()> {
        buf.clear();
        let n = self.io.read_until(b'\n', buf).await?;
        ensure!(n > 0, "connection closed by the controller");
        *budget += n;
        ensure!(*budget <= HEADER_BYTES_MAX, "answer headers too large");
        while buf.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            buf.pop();
        }
        Ok(())
    }
}

/// A simulated node's hello as release `release`, the primary of group
/// `group`. With its bootstrap token (`first`), it names the credential it
/// chose, derived from the token; later hellos present that credential.
pub(super) fn hello_body(
    node_id: &str,
    token: &str,
    release: u32,
    group: &str,
    first: bool,
) -> anyhow::Result<Vec<u8>> {
    let info = ReleaseInfo::of(Release(release))?;
    let hello = Hello::new(
        node_id,
        token,
        info,
        Role::Primary,
        group,
        "http://127.50.255.1:9",
    );
    Ok(serde_json::to_vec(&Hello {
        new_credential: first.then(|| credential_of(token)),
        ..hello
    })?)
}

/// The credential a simulated node chooses: unique per token.
fn credential_of(token: &str) -> String {
    format!(
        "sim-{}",
        handover_core::identity::SecretDigest::of(token).as_str()
    )
}

pub(super) fn parse<T: serde::de::DeserializeOwned>(
    status: u16,
    body: &[u8],
    what: &str,
) -> anyhow::Result<T> {
    ensure!(
        status == 200,
        "{what}: controller answered {status}: {}",
        String::from_utf8_lossy(body)
            .chars()
            .take(ANSWER_SHOWN_CHARS_MAX)
            .collect::<String>()
    );
    serde_json::from_slice(body).with_context(|| format!("{what}: unexpected answer"))
}
