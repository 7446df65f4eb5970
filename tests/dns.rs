//! A tiny authoritative DNS server on loopback (UDP) answering TXT queries
//! from a table the test fills: what `PLINTH_DNS_RESOLVER` points at when
//! domains are proven by DNS.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::rdata::TXT;
use hickory_proto::rr::{RData, Record, RecordType};

use crate::harness::{TestApp, TestResult};

pub struct DnsServer {
    pub addr: SocketAddr,
    records: Arc<Mutex<HashMap<String, Vec<String>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl DnsServer {
    pub async fn start() -> TestResult<Self> {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
        let addr = socket.local_addr()?;
        let records: Arc<Mutex<HashMap<String, Vec<String>>>> = Arc::default();
        let table = Arc::clone(&records);
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let Ok((n, from)) = socket.recv_from(&mut buf).await else { return };
                let Ok(query) = Message::from_vec(&buf[..n]) else { continue };
                let mut answer = Message::response(query.metadata.id, query.metadata.op_code);
                answer.metadata.recursion_desired = query.metadata.recursion_desired;
                answer.metadata.recursion_available = true;
                answer.metadata.authoritative = true;
                let mut known = false;
                for q in &query.queries {
                    answer.add_query(q.clone());
                    let name = q.name().to_ascii().trim_end_matches('.').to_ascii_lowercase();
                    let values = table.lock().unwrap_or_else(|p| p.into_inner()).get(&name).cloned();
                    if let Some(values) = values {
                        known = true;
                        if q.query_type() == RecordType::TXT {
                            for value in values {
                                let rdata = RData::TXT(TXT::new(vec![value]));
                                answer.add_answer(Record::from_rdata(q.name().clone(), 60, rdata));
                            }
                        }
                    }
                }
                if !known {
                    answer.metadata.response_code = ResponseCode::NXDomain;
                }
                if let Ok(bytes) = answer.to_vec() {
                    let _ = socket.send_to(&bytes, from).await;
                }
            }
        });
        Ok(Self { addr, records, task })
    }

    /// Publishes `values` as the TXT records of `name`.
    pub fn set_txt(&self, name: &str, values: &[&str]) {
        let values = values.iter().map(|v| (*v).to_owned()).collect();
        self.records.lock().unwrap_or_else(|p| p.into_inner()).insert(name.to_ascii_lowercase(), values);
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Proves `domain` for `tenant` by its TXT record, as its owner.
pub async fn verify_domain(app: &TestApp, dns: &DnsServer, tenant: &str, domain: &str) -> TestResult {
    let res = app
        .req(reqwest::Method::POST, tenant, "/v1/domains")
        .json(&serde_json::json!({ "domain": domain }))
        .send()
        .await?;
    assert_eq!(res.status(), 201);
    let added: serde_json::Value = res.json().await?;
    dns.set_txt(&format!("_plinth-challenge.{domain}"), &[added["dns_record"]["value"].as_str().ok_or("no record")?]);
    let res = app.req(reqwest::Method::POST, tenant, &format!("/v1/domains/{domain}/verify")).send().await?;
    assert_eq!(res.status(), 200, "{domain} verified");
    Ok(())
}
