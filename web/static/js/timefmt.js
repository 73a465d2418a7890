// Times as the page shows them: relative ("now", "5 s", "3 min", "2 h", "4 d") and the
// local day for separators, recomputed as the page stays open.

export function relative(atMs, nowMs = Date.now()) {
  const s = Math.max(0, Math.round((nowMs - atMs) / 1000));
  if (s < 5) return 'now';
  if (s < 60) return `${s} s ago`;
  const min = Math.floor(s / 60);
  if (min < 60) return `${min} min ago`;
  const h = Math.floor(min / 60);
  if (h < 24) return `${h} h ago`;
  const d = Math.floor(h / 24);
  if (d < 14) return `${d} d ago`;
  return new Date(atMs).toLocaleDateString();
}

export function dayOf(atMs) {
  return new Date(atMs).toLocaleDateString(undefined, { weekday: 'short', year: 'numeric', month: 'short', day: 'numeric' });
}

export function clock(atMs) {
  return new Date(atMs).toLocaleTimeString(undefined, { hour: '2-digit', minute: '2-digit' });
}
