//! A real SMTP listener for tests: speaks enough SMTP for lettre (EHLO, MAIL,
//! RCPT, DATA with dot-unstuffing, RSET, NOOP, QUIT), records every accepted
//! message, and can be told to fail temporarily, reject, stall, or go down.

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Accept,
    /// 451 at MAIL FROM.
    TempFail,
    /// 550 at RCPT TO.
    Reject,
    /// Reads the whole message after DATA, then never answers.
    Stall,
}

#[derive(Default)]
struct State {
    mode: Option<Mode>,
    accepted: Vec<String>,
    /// Messages read whole and then never answered (`Mode::Stall`).
    stalled: usize,
}

pub struct SmtpServer {
    pub port: u16,
    state: Arc<Mutex<State>>,
    tasks: JoinSet<()>,
}

impl SmtpServer {
    pub async fn start() -> std::io::Result<Self> {
        Self::start_on(0).await
    }

    pub async fn start_on(port: u16) -> std::io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", port)).await?;
        let port = listener.local_addr()?.port();
        let state = Arc::new(Mutex::new(State { mode: Some(Mode::Accept), accepted: Vec::new(), stalled: 0 }));
        let mut server = Self { port, state, tasks: JoinSet::new() };
        server.serve(listener);
        Ok(server)
    }

    fn serve(&mut self, listener: TcpListener) {
        let state = Arc::clone(&self.state);
        self.tasks.spawn(async move {
            let mut sessions = JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                let state = Arc::clone(&state);
                sessions.spawn(async move {
                    let _ = session(stream, state).await;
                });
            }
        });
    }

    pub fn url(&self) -> String {
        format!("smtp://127.0.0.1:{}", self.port)
    }

    pub fn set_mode(&self, mode: Mode) {
        self.lock().mode = Some(mode);
    }

    /// How many messages were read whole and left unanswered (`Mode::Stall`).
    pub fn stalled(&self) -> usize {
        self.lock().stalled
    }

    /// Raw messages accepted so far (250 after DATA).
    pub fn accepted(&self) -> Vec<String> {
        self.lock().accepted.clone()
    }

    /// Stops listening and drops every open session.
    pub fn stop(&mut self) {
        self.tasks.abort_all();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

async fn session(stream: tokio::net::TcpStream, state: Arc<Mutex<State>>) -> std::io::Result<()> {
    let mode = || state.lock().unwrap_or_else(|p| p.into_inner()).mode.unwrap_or(Mode::Accept);
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read);
    write.write_all(b"220 localhost ESMTP plinth-test\r\n").await?;
    let mut line = String::new();
    loop {
        line.clear();
        if lines.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let verb = line.get(..4).unwrap_or("").to_ascii_uppercase();
        let reply: &[u8] = match verb.as_str() {
            "EHLO" => b"250-localhost\r\n250 8BITMIME\r\n",
            "HELO" | "RSET" | "NOOP" => b"250 OK\r\n",
            "MAIL" if mode() == Mode::TempFail => b"451 4.3.0 try again later\r\n",
            "MAIL" => b"250 OK\r\n",
            "RCPT" if mode() == Mode::Reject => b"550 5.1.1 mailbox unavailable\r\n",
            "RCPT" => b"250 OK\r\n",
            "DATA" => {
                write.write_all(b"354 end with <CRLF>.<CRLF>\r\n").await?;
                let mut message = String::new();
                loop {
                    line.clear();
                    if lines.read_line(&mut line).await? == 0 {
                        return Ok(());
                    }
                    if line == ".\r\n" {
                        break;
                    }
                    message.push_str(line.strip_prefix('.').filter(|_| line.starts_with("..")).unwrap_or(&line));
                }
                if mode() == Mode::Stall {
                    state.lock().unwrap_or_else(|p| p.into_inner()).stalled += 1;
                    std::future::pending::<()>().await;
                }
                state.lock().unwrap_or_else(|p| p.into_inner()).accepted.push(message);
                b"250 2.0.0 queued\r\n"
            }
            "QUIT" => {
                write.write_all(b"221 bye\r\n").await?;
                return Ok(());
            }
            _ => b"502 5.5.2 not implemented\r\n",
        };
        write.write_all(reply).await?;
    }
}
