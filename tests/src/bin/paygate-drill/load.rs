//! The drill's load: merchants confirming orders at random replicas and
//! retrying the same body at another replica on a transport error, 5xx, 202
//! or 409; cancels (partial and full, racing at different replicas, same and
//! new Idempotency-Keys) of approved payments; holds racing on a SKU with
//! little stock, then confirms of the held orders. Every answer is recorded
//! ([`Answer`]) for the checks.

use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::{Duration, Instant},
};

use serde_json::{json, Value};

use crate::cluster::Cluster;

/// Tries of one confirm (or cancel) before the merchant stops asking and
/// would poll `GET` instead.
const MAX_TRIES: usize = 8;

/// A small deterministic generator (xorshift64*): a worker's choices follow
/// from the drill's seed (the processes' timing does not).
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed` (any value; zero is mapped away).
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// A number in `0..below`.
    pub fn below(&mut self, below: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % below.max(1)
    }

    /// A duration of `min..max` ms.
    pub fn ms(&mut self, min: u64, max: u64) -> Duration {
        Duration::from_millis(min + self.below(max.saturating_sub(min).max(1)))
    }
}

/// Which merchant API operation an answer belongs to; its OpenAPI path and
/// method say which statuses are documented.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// `POST /v1/payments/confirm`.
    Confirm,
    /// `POST /v1/payments/{paymentId}/cancel`.
    Cancel,
    /// `POST /v1/holds`.
    Hold,
    /// `DELETE /v1/holds/{holdId}`.
    Release,
    /// `GET /v1/payments/orders/{orderId}`.
    GetByOrder,
    /// `GET /v1/inventory/{sku}`.
    Level,
    /// `PUT /v1/inventory/{sku}`.
    Restock,
}

impl Op {
    /// The OpenAPI (path template, method).
    pub fn operation(self) -> (&'static str, &'static str) {
        match self {
            Op::Confirm => ("/v1/payments/confirm", "post"),
            Op::Cancel => ("/v1/payments/{payment_id}/cancel", "post"),
            Op::Hold => ("/v1/holds", "post"),
            Op::Release => ("/v1/holds/{hold_id}", "delete"),
            Op::GetByOrder => ("/v1/payments/orders/{order_id}", "get"),
            Op::Level => ("/v1/inventory/{sku}", "get"),
            Op::Restock => ("/v1/inventory/{sku}", "put"),
        }
    }
}

/// One answer a merchant got (or did not get).
#[derive(Clone, Debug)]
pub struct Answer {
    /// The operation.
    pub op: Op,
    /// The order it concerns.
    pub order: String,
    /// The replica asked.
    pub replica: usize,
    /// When the request was sent.
    pub started: Instant,
    /// When the answer (or the transport error) came.
    pub ended: Instant,
    /// The HTTP status; 0 for a transport error (no answer).
    pub status: u16,
    /// The `Content-Type` answered.
    pub content_type: String,
    /// The body as JSON (`Null` when it was not JSON).
    pub body: Value,
    /// The transport error, when there was one.
    pub error: Option<String>,
}

impl Answer {
    /// The problem's `code`, when the body has one.
    pub fn code(&self) -> &str {
        self.body["code"].as_str().unwrap_or("")
    }

    /// Worth sending again (the same body, at another replica).
    fn retry(&self) -> bool {
        matches!(self.status, 0 | 202 | 409 | 500..=599)
    }
}

/// The payment a cancel worker is cancelling.
#[derive(Clone, Copy)]
struct Target<'a> {
    http: &'a reqwest::Client,
    order: &'a str,
    pid: &'a str,
}

/// What the merchants share: the answers, the orders, the approved payments
/// waiting for a cancel.
pub struct Load {
    cluster: Arc<Cluster>,
    key: String,
    run: String,
    sku: String,
    deadline: Instant,
    answers: Mutex<Vec<Answer>>,
    orders: Mutex<Vec<String>>,
    next: AtomicUsize,
    to_cancel: Mutex<VecDeque<(String, String, i64)>>,
    stop: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A merchant's HTTP client: no idle connection is kept, so a request to a
/// restarted replica never rides a connection of the process that died (a
/// transport error then means the replica was down, not that the pool was
/// stale); 30 s per request.
pub fn client() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(0)
        .build()?)
}

impl Load {
    /// The load of one drill: orders are `drill-{run}-NNNNNN`, the held SKU
    /// is `sku`, new orders stop at `deadline`.
    pub fn new(
        cluster: Arc<Cluster>,
        key: String,
        run: String,
        sku: String,
        deadline: Instant,
    ) -> Arc<Self> {
        Arc::new(Self {
            cluster,
            key,
            run,
            sku,
            deadline,
            answers: Mutex::new(Vec::new()),
            orders: Mutex::new(Vec::new()),
            next: AtomicUsize::new(0),
            to_cancel: Mutex::new(VecDeque::new()),
            stop: AtomicBool::new(false),
        })
    }

    /// Every answer so far.
    pub fn answers(&self) -> Vec<Answer> {
        lock(&self.answers).clone()
    }

    /// Every order a merchant started.
    pub fn orders(&self) -> Vec<String> {
        lock(&self.orders).clone()
    }

    /// Tells the cancel workers to finish what is queued and stop.
    pub fn finish(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Sends one request to replica `replica` and records its answer.
    #[allow(clippy::too_many_arguments)] // one call site per operation
    async fn call(
        &self,
        http: &reqwest::Client,
        op: Op,
        order: &str,
        replica: usize,
        method: reqwest::Method,
        path: &str,
        request: Option<&Value>,
        idempotency_key: Option<&str>,
    ) -> Answer {
        let mut req = http
            .request(method, format!("{}{path}", self.cluster.base(replica)))
            .bearer_auth(&self.key);
        if let Some(b) = request {
            req = req.json(b);
        }
        if let Some(k) = idempotency_key {
            req = req.header("Idempotency-Key", k);
        }
        let started = Instant::now();
        let (status, content_type, body, error) = match req.send().await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                let ct = resp
                    .headers()
                    .get(reqwest::header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned();
                match resp.bytes().await {
                    Ok(bytes) => (
                        status,
                        ct,
                        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
                        None,
                    ),
                    Err(e) => (0, String::new(), Value::Null, Some(e.to_string())),
                }
            }
            Err(e) => (0, String::new(), Value::Null, Some(format!("{e:?}"))),
        };
        let answer = Answer {
            op,
            order: order.to_owned(),
            replica,
            started,
            ended: Instant::now(),
            status,
            content_type,
            body,
            error,
        };
        lock(&self.answers).push(answer.clone());
        answer
    }

    /// One merchant worker: new orders until the deadline, each to its end.
    pub async fn merchant(self: Arc<Self>, worker: u64, seed: u64) {
        let Ok(http) = client() else { return };
        let mut rng = Rng::new(seed ^ (worker << 32));
        while Instant::now() < self.deadline {
            let i = self.next.fetch_add(1, Ordering::SeqCst);
            self.order(&http, &mut rng, i).await;
        }
    }

    async fn order(&self, http: &reqwest::Client, rng: &mut Rng, i: usize) {
        let order = format!("drill-{}-{i:06}", self.run);
        lock(&self.orders).push(order.clone());
        let n = self.cluster.len() as u64;
        if i.is_multiple_of(5) {
            // A held order: the buyer reserves stock in checkout, sometimes
            // twice at once at two replicas (a double click).
            let body = json!({
                "orderId": order,
                "items": [{"sku": self.sku, "quantity": 1 + (i % 2)}],
                "ttlSeconds": 20,
            });
            let mut held = None;
            for _ in 0..4 {
                let r = rng.below(n) as usize;
                let answers = if rng.below(3) == 0 {
                    let other = (r + 1 + rng.below(n - 1) as usize) % n as usize;
                    let (a, b) = tokio::join!(
                        self.call(
                            http,
                            Op::Hold,
                            &order,
                            r,
                            reqwest::Method::POST,
                            "/v1/holds",
                            Some(&body),
                            None
                        ),
                        self.call(
                            http,
                            Op::Hold,
                            &order,
                            other,
                            reqwest::Method::POST,
                            "/v1/holds",
                            Some(&body),
                            None
                        ),
                    );
                    vec![a, b]
                } else {
                    vec![
                        self.call(
                            http,
                            Op::Hold,
                            &order,
                            r,
                            reqwest::Method::POST,
                            "/v1/holds",
                            Some(&body),
                            None,
                        )
                        .await,
                    ]
                };
                if let Some(a) = answers.iter().find(|a| matches!(a.status, 200 | 201)) {
                    held = a.body["holdId"].as_str().map(str::to_owned);
                    break;
                }
                if answers.iter().all(|a| !matches!(a.status, 0 | 500..=599)) {
                    break;
                }
                tokio::time::sleep(rng.ms(50, 300)).await;
            }
            let Some(hold) = held else {
                return; // out of stock: the buyer does not pay
            };
            if rng.below(8) == 0 {
                let r = rng.below(n) as usize;
                let path = format!("/v1/holds/{hold}");
                self.call(
                    http,
                    Op::Release,
                    &order,
                    r,
                    reqwest::Method::DELETE,
                    &path,
                    None,
                    None,
                )
                .await;
                return;
            }
        }
        self.confirm(http, rng, i, &order).await;
    }

    async fn confirm(&self, http: &reqwest::Client, rng: &mut Rng, i: usize, order: &str) {
        let amount = 1_000 + (i % 50) as i64 * 100;
        let body = json!({
            "paymentKey": format!("pk_drill_{}_{i:06}", self.run),
            "orderId": order,
            "amount": amount,
        });
        let key = format!("idem-{order}");
        let n = self.cluster.len() as u64;
        let mut r = rng.below(n) as usize;
        for _ in 0..MAX_TRIES {
            let path = "/v1/payments/confirm";
            let answers = if rng.below(10) == 0 {
                // The merchant's retry overtakes its first try at another replica.
                let other = (r + 1) % n as usize;
                let (a, b) = tokio::join!(
                    self.call(
                        http,
                        Op::Confirm,
                        order,
                        r,
                        reqwest::Method::POST,
                        path,
                        Some(&body),
                        Some(&key)
                    ),
                    self.call(
                        http,
                        Op::Confirm,
                        order,
                        other,
                        reqwest::Method::POST,
                        path,
                        Some(&body),
                        Some(&key)
                    ),
                );
                vec![a, b]
            } else {
                vec![
                    self.call(
                        http,
                        Op::Confirm,
                        order,
                        r,
                        reqwest::Method::POST,
                        path,
                        Some(&body),
                        Some(&key),
                    )
                    .await,
                ]
            };
            if let Some(ok) = answers.iter().find(|a| a.status == 200) {
                if let Some(pid) = ok.body["paymentId"].as_str() {
                    let mut queue = lock(&self.to_cancel);
                    // Bounded, so the cancels keep pace with the load and
                    // end with it.
                    if rng.below(10) < 4 && queue.len() < 32 {
                        queue.push_back((order.to_owned(), pid.to_owned(), amount));
                    }
                }
                return;
            }
            if !answers.iter().all(Answer::retry) {
                return;
            }
            tokio::time::sleep(rng.ms(50, 400)).await;
            r = (r + 1 + rng.below(n - 1) as usize) % n as usize;
        }
    }

    /// One cancel worker: takes approved payments off the queue until the
    /// load is finished and the queue is empty.
    pub async fn canceller(self: Arc<Self>, worker: u64, seed: u64) {
        let Ok(http) = client() else { return };
        let mut rng = Rng::new(seed ^ (worker << 40) ^ 0xCA);
        loop {
            let next = lock(&self.to_cancel).pop_front();
            let Some((order, pid, amount)) = next else {
                if self.stop.load(Ordering::SeqCst) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let n = self.cluster.len();
            let r = rng.below(n as u64) as usize;
            let other = (r + 1) % n;
            let k = |what: &str| format!("cx-{pid}-{what}");
            let (k_full, k_p1, k_p2, k_rest) = (k("full"), k("p1"), k("p2"), k("rest"));
            let (k_half, k_all, k_q) = (k("half"), k("all"), k("q"));
            let t = Target {
                http: &http,
                order: &order,
                pid: &pid,
            };
            match rng.below(4) {
                0 => {
                    // A full cancel sent twice at once, one key, two replicas.
                    tokio::join!(
                        self.cancel(&t, rng.below(u64::MAX), r, None, &k_full),
                        self.cancel(&t, rng.below(u64::MAX), other, None, &k_full),
                    );
                }
                1 => {
                    // Two partial cancels under new keys, then the rest.
                    self.cancel(&t, rng.below(u64::MAX), r, Some(amount / 3), &k_p1)
                        .await;
                    self.cancel(&t, rng.below(u64::MAX), other, Some(amount / 3), &k_p2)
                        .await;
                    self.cancel(&t, rng.below(u64::MAX), r, None, &k_rest).await;
                }
                2 => {
                    // A partial and a full cancel racing under different keys.
                    tokio::join!(
                        self.cancel(&t, rng.below(u64::MAX), r, Some(amount / 2), &k_half),
                        self.cancel(&t, rng.below(u64::MAX), other, None, &k_all),
                    );
                }
                _ => {
                    // A partial cancel replayed at another replica, then its
                    // key reused with another amount (422).
                    self.cancel(&t, rng.below(u64::MAX), r, Some(amount / 4), &k_q)
                        .await;
                    self.cancel(&t, rng.below(u64::MAX), other, Some(amount / 4), &k_q)
                        .await;
                    self.cancel(&t, rng.below(u64::MAX), r, Some(amount / 5), &k_q)
                        .await;
                }
            }
        }
    }

    /// Cancels `amount` (`None`: the balance) of `t`'s payment under `key`
    /// at replica `r`, retrying at the next replica as a merchant would.
    async fn cancel(
        &self,
        t: &Target<'_>,
        seed: u64,
        mut r: usize,
        amount: Option<i64>,
        key: &str,
    ) {
        let Target { http, order, pid } = *t;
        let mut body = json!({"cancelReason": "drill refund"});
        if let Some(a) = amount {
            body["cancelAmount"] = json!(a);
        }
        let path = format!("/v1/payments/{pid}/cancel");
        let n = self.cluster.len();
        let mut rng = Rng::new(seed);
        for _ in 0..MAX_TRIES {
            let a = self
                .call(
                    http,
                    Op::Cancel,
                    order,
                    r,
                    reqwest::Method::POST,
                    &path,
                    Some(&body),
                    Some(key),
                )
                .await;
            // A cancel not approved yet (409 NOT_APPROVED) is retried too: a
            // payment answered 200 is approved, whatever a lagging read says.
            if !a.retry() {
                return;
            }
            tokio::time::sleep(rng.ms(50, 400)).await;
            r = (r + 1) % n;
        }
    }

    /// The merchant restocking: every 2 s, when fewer than 4 units are
    /// available (`GET /v1/inventory/{sku}` at a random replica), 10 more
    /// (`PUT`, racing the holds; refused when below sold + held), until the
    /// load's deadline, so holds keep racing for little stock all along.
    pub async fn restocker(self: Arc<Self>, seed: u64) {
        let Ok(http) = client() else { return };
        let mut rng = Rng::new(seed ^ 0x5C0C);
        let path = format!("/v1/inventory/{}", self.sku);
        while Instant::now() < self.deadline {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let n = self.cluster.len() as u64;
            let level = self
                .call(
                    &http,
                    Op::Level,
                    "",
                    rng.below(n) as usize,
                    reqwest::Method::GET,
                    &path,
                    None,
                    None,
                )
                .await;
            let (Some(stock), Some(available)) = (
                level.body["stock"].as_i64(),
                level.body["available"].as_i64(),
            ) else {
                continue;
            };
            if available < 4 {
                let body = json!({ "stock": stock + 10 });
                self.call(
                    &http,
                    Op::Restock,
                    "",
                    rng.below(n) as usize,
                    reqwest::Method::PUT,
                    &path,
                    Some(&body),
                    None,
                )
                .await;
            }
        }
    }

    /// `GET /v1/payments/orders/{orderId}` after healing, at a random
    /// replica, 8 at a time: of every order whose last confirm answer was
    /// not a 200 (the ones the merchant would poll) and of every 10th other
    /// one: the last answers the checks compare.
    pub async fn read_back(self: &Arc<Self>, seed: u64) -> anyhow::Result<usize> {
        use futures_util::StreamExt;
        let mut last = std::collections::HashMap::<String, u16>::new();
        for a in lock(&self.answers).iter().filter(|a| a.op == Op::Confirm) {
            last.insert(a.order.clone(), a.status);
        }
        let mut rng = Rng::new(seed ^ 0xBAC);
        let n = self.cluster.len() as u64;
        let picked: Vec<(String, usize)> = self
            .orders()
            .into_iter()
            .enumerate()
            .filter(|(i, o)| last.get(o) != Some(&200) || i % 10 == 0)
            .map(|(_, o)| (o, rng.below(n) as usize))
            .collect();
        let count = picked.len();
        let http = client()?;
        futures_util::stream::iter(picked)
            .for_each_concurrent(8, |(order, r)| {
                let http = &http;
                async move {
                    let path = format!("/v1/payments/orders/{order}");
                    self.call(
                        http,
                        Op::GetByOrder,
                        &order,
                        r,
                        reqwest::Method::GET,
                        &path,
                        None,
                        None,
                    )
                    .await;
                }
            })
            .await;
        Ok(count)
    }
}
