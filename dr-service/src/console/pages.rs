//! The console's pages ([`maud`] escapes every value: an instance name holding markup is
//! shown as text).

use failback_api::{Event, FailbackState, LogEntry, RecoveryInstance, Role, TokenKind};
use maud::{html, Markup, DOCTYPE};

use super::chart;
use super::fmt::{self, ago, bytes, duration, state_label, time};
use super::samples::{state_index, FleetSample, RatePoint, STATES};
use super::{Ctx, ListQuery};
use crate::service::TokenView;

fn head(title: &str) -> Markup {
    html! {
        head {
            meta charset="utf-8";
            meta name="viewport" content="width=device-width, initial-scale=1";
            title { (title) " · failback console" }
            link rel="stylesheet" href="/console/assets/console.css";
            script src="/console/assets/console.js" defer {}
        }
    }
}

/// A page without a session (errors, refusals).
pub fn message(title: &str, msg: &str) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(title))
            body {
                main.narrow {
                    h1 { (title) }
                    p.error id="message" { (msg) }
                    p { a href="/console/instances" { "Back to the console" } }
                }
            }
        }
    }
}

pub fn login(note: Option<&str>, error: Option<&str>) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head("Log in"))
            body {
                main.narrow {
                    h1 { "failback console" }
                    @if let Some(n) = note { p.note id="login-note" { (n) } }
                    @if let Some(e) = error { p.error id="login-error" { (e) } }
                    form method="post" action="/console/login" id="login-form" {
                        label for="secret" { "Admin credential (fbcr_…) or admin token" }
                        input type="password" id="secret" name="secret" autocomplete="off" required;
                        button type="submit" id="login-button" { "Log in" }
                    }
                }
            }
        }
    }
}

pub fn layout(ctx: &Ctx, title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(title))
            body {
                header {
                    nav {
                        strong { "failback" }
                        a href="/console/instances" { "Instances" }
                        a href="/console/agents" { "Agents" }
                        a href="/console/tokens" { "Tokens" }
                    }
                    div.user {
                        span id="whoami" { (ctx.caller.actor) " (" (ctx.caller.role) ")" }
                        form method="post" action="/console/logout" {
                            input type="hidden" name="csrf" value=(ctx.csrf);
                            button type="submit" id="logout" { "Log out" }
                        }
                    }
                }
                div id="conn-lost" hidden {
                    "Connection to the service lost: this page is not up to date. Retrying…"
                }
                main {
                    h1 id="title" { (title) }
                    (body)
                }
            }
        }
    }
}

/// The region the script refreshes (the same URL with `partial=1`).
pub fn live_region(m: Markup) -> Markup {
    html! { div id="live" { (m) } }
}

fn state_badge(s: FailbackState) -> Markup {
    html! { span class=(format!("badge state-{}", state_index(s))) { (state_label(s)) } }
}

fn agent_health(i: &RecoveryInstance, now: u64, timeout: u64) -> Markup {
    match i.agent.last_seen_at {
        Some(t) if now.saturating_sub(t) <= timeout => html! { span.ok { "OK" } },
        Some(_) => html! { span.bad { "NOT SEEN" } },
        None => html! { span.muted { "—" } },
    }
}

fn matches(i: &RecoveryInstance, q: &ListQuery) -> bool {
    let state_ok = match q.state.as_deref().filter(|s| !s.is_empty()) {
        Some(s) => i.failback.state.to_string() == s,
        None => true,
    };
    let name_ok = match q.q.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
        Some(n) => {
            let n = n.to_lowercase();
            fmt::name(i).to_lowercase().contains(&n) || i.recovery_instance_id.contains(&n)
        }
        None => true,
    };
    state_ok && name_ok
}

fn sorted<'a>(items: &'a [RecoveryInstance], q: &ListQuery) -> Vec<&'a RecoveryInstance> {
    let mut v: Vec<&RecoveryInstance> = items.iter().filter(|i| matches(i, q)).collect();
    match q.sort.as_deref() {
        Some("progress") => v.sort_by(|a, b| fmt::progress(a).total_cmp(&fmt::progress(b))),
        Some("lag") => v.sort_by_key(|i| std::cmp::Reverse(i.failback.lag_secs.unwrap_or(0))),
        _ => v.sort_by(|a, b| fmt::name(a).cmp(fmt::name(b))),
    }
    v
}

/// Filter form and the actions on the selection (outside the live region, so a refresh
/// never swaps a button under the pointer).
pub fn instances(ctx: &Ctx, q: &ListQuery, live: Markup) -> Markup {
    let sel = |v: &str, cur: Option<&str>| cur == Some(v);
    html! {
        form.filters method="get" action="/console/instances" id="filter" {
            input type="search" name="q" id="filter-q" placeholder="name or id" value=(q.q.clone().unwrap_or_default());
            select name="state" id="filter-state" {
                option value="" { "any state" }
                @for s in STATES {
                    option value=(s.to_string()) selected[sel(&s.to_string(), q.state.as_deref())] { (state_label(s)) }
                }
            }
            select name="sort" id="sort" {
                option value="name" { "sort by name" }
                option value="progress" selected[sel("progress", q.sort.as_deref())] { "sort by progress" }
                option value="lag" selected[sel("lag", q.sort.as_deref())] { "sort by lag" }
            }
            button type="submit" { "Apply" }
        }
        @if ctx.can(Role::Operator) {
            form.actions method="post" action="/console/actions" id="act" {
                input type="hidden" name="csrf" value=(ctx.csrf);
                button type="submit" name="action" value="launch" id="launch-selected" { "Launch selected…" }
                " "
                button type="submit" name="action" value="stop" id="stop-selected" { "Stop selected…" }
            }
        }
        (live_region(live))
    }
}

pub fn instances_live(
    ctx: &Ctx,
    items: &[RecoveryInstance],
    q: &ListQuery,
    fleet: &[FleetSample],
    now: u64,
    agent_timeout: u64,
) -> Markup {
    let mut counts = [0usize; 6];
    for i in items {
        counts[state_index(i.failback.state)] += 1;
    }
    let shown = sorted(items, q);
    let operator = ctx.can(Role::Operator);
    html! {
        div.counts id="counts" {
            span.count { b { (items.len()) } " instances" }
            @for (k, s) in STATES.iter().enumerate() {
                a class=(format!("count state-{k}")) href=(format!("/console/instances?state={s}"))
                    data-state=(s.to_string()) { b { (counts[k]) } " " (state_label(*s)) }
            }
        }
        (chart::fleet(fleet))
        table id="instances" {
            thead { tr {
                @if operator { th { "" } }
                th { "Name" } th { "Instance" } th { "Failback" } th { "Replication" }
                th { "Progress" } th { "Lag" } th { "Backlog" } th { "ETA" } th { "Agent" }
            } }
            tbody {
                @for i in &shown {
                    @let id = &i.recovery_instance_id;
                    @let f = &i.failback;
                    tr data-id=(id) data-state=(f.state.to_string()) {
                        @if operator {
                            td { input type="checkbox" name="id" value=(id) form="act" aria-label="select"; }
                        }
                        td.name { a href=(format!("/console/instances/{id}")) { (fmt::name(i)) } }
                        td.mono { (id) }
                        td.state { (state_badge(f.state)) }
                        td { (f.replication_state.to_string()) }
                        td { progress value=(format!("{:.3}", fmt::progress(i))) max="1" {} " "
                             (format!("{:.0} %", fmt::progress(i) * 100.0)) }
                        td { (f.lag_secs.map(duration).unwrap_or_default()) }
                        td { (bytes(f.disks.iter().map(|d| d.backlog_bytes).sum())) }
                        td { (f.eta_at.map(|t| duration(t.saturating_sub(now))).unwrap_or_default()) }
                        td { (agent_health(i, now, agent_timeout)) }
                    }
                }
            }
        }
        @if shown.is_empty() { p.muted id="empty" { "No instance matches." } }
    }
}

/// What the detail page shows.
pub struct InstanceView<'a> {
    pub inst: &'a RecoveryInstance,
    pub events: &'a [Event],
    pub logs: &'a [LogEntry],
    pub rates: &'a [RatePoint],
    pub disk_rates: &'a [Option<f64>],
    pub now: u64,
    pub agent_timeout: u64,
}

pub fn instance(ctx: &Ctx, i: &RecoveryInstance, live: Markup) -> Markup {
    let id = &i.recovery_instance_id;
    html! {
        p.mono { (id) }
        @if ctx.can(Role::Operator) {
            div.actions {
                form method="post" action="/console/actions" {
                    input type="hidden" name="csrf" value=(ctx.csrf);
                    input type="hidden" name="id" value=(id);
                    button type="submit" name="action" value="launch" id="launch-one" { "Launch…" }
                    " "
                    button type="submit" name="action" value="stop" id="stop-one" { "Stop…" }
                }
                @if ctx.can(Role::Admin) {
                    form method="post" action=(format!("/console/instances/{id}/bandwidth")) id="bandwidth" {
                        input type="hidden" name="csrf" value=(ctx.csrf);
                        label { "Bandwidth limit (Mbit/s, 0 = none) "
                            input type="number" min="0" name="mbps" value=(i.config.bandwidth_throttling_mbps); }
                        button type="submit" { "Set" }
                    }
                }
            }
        }
        (live_region(live))
    }
}

pub fn instance_live(v: &InstanceView<'_>) -> Markup {
    let i = v.inst;
    let f = &i.failback;
    let boots: Vec<&Event> = v
        .events
        .iter()
        .filter(|e| e.kind == "CLIENT_BOOT_FAILED")
        .collect();
    html! {
        dl.summary {
            dt { "Failback" } dd id="state" { (state_badge(f.state)) }
            dt { "Replication" } dd id="replication" { (f.replication_state.to_string()) }
            dt { "Round" } dd { (f.round) }
            dt { "Lag" } dd id="lag" { (f.lag_secs.map(duration).unwrap_or_else(|| "—".into())) }
            dt { "ETA" } dd { (f.eta_at.map(|t| duration(t.saturating_sub(v.now))).unwrap_or_else(|| "—".into())) }
            dt { "Agent" } dd { (i.agent.address.clone().unwrap_or_default()) " " (agent_health(i, v.now, v.agent_timeout)) " seen " (ago(i.agent.last_seen_at, v.now)) }
            dt { "Client" } dd { (f.client_id.clone().unwrap_or_else(|| "not paired".into())) " seen " (ago(f.client_last_seen_at, v.now)) }
            dt { "Bandwidth" } dd { @if i.config.bandwidth_throttling_mbps == 0 { "unlimited" } @else { (i.config.bandwidth_throttling_mbps) " Mbit/s" } }
            @if let Some(j) = &f.launch_job_id { dt { "Launch" } dd { (j) } }
            @if !f.errors.is_empty() { dt { "Errors" } dd.bad { @for e in &f.errors { (e.to_string()) " " } } }
            @if let Some(m) = &f.last_error_message { dt { "Last error" } dd.bad { (m) } }
        }
        h2 { "Disks" }
        table id="disks" {
            thead { tr { th { "Volume" } th { "Local disk" } th { "Progress" } th { "Bytes" } th { "Rate" } th { "ETA" } th { "Backlog" } th { "Wire" } } }
            tbody {
                @for (k, d) in f.disks.iter().enumerate() {
                    @let rate = v.disk_rates.get(k).copied().flatten();
                    @let left = d.total_bytes.saturating_sub(d.rescanned_bytes);
                    tr {
                        td.mono { (d.remote_id) } td.mono { (d.local_path) }
                        @let done = if fmt::consistent(i) { d.total_bytes } else { d.replicated_bytes };
                        td { progress value=(done) max=(d.total_bytes.max(1)) {} }
                        td { (bytes(done)) " / " (bytes(d.total_bytes))
                             @if fmt::consistent(i) { " consistent" } }
                        td { (rate.map(|r| format!("{}/s", bytes(fmt::whole(r)))).unwrap_or_else(|| "—".into())) }
                        td { @match rate { Some(r) if r > 0.0 && left > 0 => (duration(fmt::whole(left as f64 / r))), _ => "—" } }
                        td { (bytes(d.backlog_bytes)) }
                        td.wire { (d.wire_summary().unwrap_or_else(|| "—".into())) }
                    }
                }
            }
        }
        @if !f.digests.is_empty() {
            h2 { "Digests (BLAKE3)" }
            table id="digests" {
                thead { tr { th { "Volume" } th { "Local disk" } th { "Local digest" } th { "Agent digest" } th { "" } } }
                tbody { @for d in &f.digests { tr {
                    td.mono { (d.remote_id) } td.mono { (d.local_path) }
                    td.mono.digest { (d.local_digest) } td.mono.digest { (d.agent_digest) }
                    td { @if d.local_digest == d.agent_digest { span.ok { "match" } } @else { span.bad { "DIFFER" } } }
                } } }
            }
        }
        h2 { "Throughput and backlog" }
        (chart::instance(v.rates))
        h2 { "Boot reports" }
        @if boots.is_empty() { p.muted { "None." } }
        @else { ul id="boot-reports" { @for e in &boots { li { (time(e.at)) " — " (e.message) } } } }
        h2 { "Appliance logs" }
        @if v.logs.is_empty() { p.muted { "None uploaded." } }
        @else { ul id="logs" { @for l in v.logs {
            li { a href=(format!("/console/instances/{}/logs/{}", i.recovery_instance_id, l.name)) { (l.name) }
                 " (" (bytes(l.bytes)) ", " (time(l.uploaded_at)) ")" }
        } } }
        h2 { "Events" }
        table id="events" {
            thead { tr { th { "Time (UTC)" } th { "Kind" } th { "Message" } th { "By" } } }
            tbody { @for e in v.events.iter().rev().take(200) { tr {
                td { (time(e.at)) } td.mono { (e.kind) } td { (e.message) } td.mono { (e.actor.clone().unwrap_or_default()) }
            } } }
        }
    }
}

pub fn agents_live(items: &[RecoveryInstance], now: u64, timeout: u64) -> Markup {
    html! {
        table id="agents" {
            thead { tr { th { "Instance" } th { "Address" } th { "Private address" } th { "Volumes" } th { "Enrolled" } th { "Last seen" } th { "Health" } } }
            tbody { @for i in items.iter().filter(|i| i.agent.enrolled_at.is_some()) { tr {
                td { a href=(format!("/console/instances/{}", i.recovery_instance_id)) { (fmt::name(i)) } }
                td.mono { (i.agent.address.clone().unwrap_or_default()) }
                td.mono { (i.agent.private_address.clone().unwrap_or_default()) }
                td { (i.agent.disks.len()) " (" (bytes(i.agent.disks.iter().map(|d| d.size_bytes).sum())) ")" }
                td { (i.agent.enrolled_at.map(time).unwrap_or_default()) }
                td { (ago(i.agent.last_seen_at, now)) }
                td { (agent_health(i, now, timeout)) }
            } } }
        }
    }
}

/// A token just created: shown once.
pub struct Created {
    pub token: String,
    pub kind: TokenKind,
    pub scope: Option<String>,
}

pub fn tokens(
    ctx: &Ctx,
    list: &[TokenView],
    items: &[RecoveryInstance],
    created: Option<Created>,
    now: u64,
) -> Markup {
    let operator = ctx.can(Role::Operator);
    html! {
        @if let Some(c) = created {
            div.created {
                p { "New " (c.kind) " token" @if let Some(s) = &c.scope { " for " (s) } ". It is shown only this once: copy it now." }
                input id="new-token" readonly value=(c.token) size="60";
                button type="button" data-copy="new-token" id="copy-token" { "Copy" }
            }
        }
        @if operator {
            form method="post" action="/console/tokens" id="token-form" {
                input type="hidden" name="csrf" value=(ctx.csrf);
                select name="kind" id="token-kind" {
                    option value="pairing" { "pairing (failback client)" }
                    option value="agent" { "agent (recovery instance)" }
                }
                select name="instance" id="token-instance" {
                    option value="" { "any instance (auto-match / new)" }
                    @for i in items { option value=(i.recovery_instance_id) { (fmt::name(i)) " — " (i.recovery_instance_id) } }
                }
                label { "valid for (s) " input type="number" name="ttl_secs" min="1" value="3600"; }
                button type="submit" id="create-token" { "Create token" }
            }
        }
        table id="tokens" {
            thead { tr { th { "Id" } th { "Kind" } th { "Instance" } th { "Created (UTC)" } th { "Expires (UTC)" } th { "Status" } @if operator { th { "" } } } }
            tbody { @for t in list { tr data-token=(t.id) {
                td.mono { (t.id) } td { (t.kind) }
                td.mono { (t.instance_id.clone().unwrap_or_else(|| "any".into())) }
                td { (time(t.created_at)) } td { (time(t.expires_at)) }
                td.status { (t.status(now)) }
                @if operator { td { @if t.status(now) == "valid" {
                    form method="post" action="/console/tokens/revoke" {
                        input type="hidden" name="csrf" value=(ctx.csrf);
                        input type="hidden" name="id" value=(t.id);
                        button type="submit" class="revoke" { "Revoke" }
                    }
                } } }
            } } }
        }
    }
}

pub fn confirm(ctx: &Ctx, action: &str, named: &[(String, String)]) -> Markup {
    html! {
        p id="confirm-text" { "Really " (action) " these " (named.len()) " instance(s)?" }
        ul id="confirm-list" { @for (id, n) in named { li { b { (n) } " " span.mono { (id) } } } }
        form method="post" action="/console/actions" {
            input type="hidden" name="csrf" value=(ctx.csrf);
            input type="hidden" name="action" value=(action);
            input type="hidden" name="confirm" value="yes";
            @for (id, _) in named { input type="hidden" name="id" value=(id); }
            button type="submit" id="confirm" { "Yes, " (action) " " (named.len()) " instance(s)" }
            " " a href="/console/instances" { "Cancel" }
        }
    }
}

pub fn results(action: &str, r: &[(String, bool, String)]) -> Markup {
    html! {
        table id="results" {
            thead { tr { th { "Instance" } th { (action) } th { "" } } }
            tbody { @for (id, ok, why) in r { tr {
                td { a href=(format!("/console/instances/{id}")) { (id) } }
                td { @if *ok { span.ok { "accepted" } } @else { span.bad { "refused" } } }
                td { (why) }
            } } }
        }
        p { a href="/console/instances" { "Back to the instances" } }
    }
}
