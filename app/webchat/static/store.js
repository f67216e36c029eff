// What the page keeps in the browser (localStorage), per origin:
// the device name, the device token (a later login without the password) and the
// resume state (resume token and the last inbox seq handled), so that a reload or a
// dropped connection continues the same session. The password is never stored.

const KEY = "switchboard.session";

export function load() {
  try {
    const saved = JSON.parse(localStorage.getItem(KEY) || "{}");
    return typeof saved === "object" && saved !== null ? saved : {};
  } catch {
    return {};
  }
}

export function save(state) {
  localStorage.setItem(KEY, JSON.stringify(state));
}

export function forget() {
  const { device } = load();
  save({ device });
}

export function deviceName() {
  const state = load();
  if (!state.device) {
    const random = crypto.getRandomValues(new Uint32Array(1))[0].toString(36);
    state.device = `web-${random}`;
    save(state);
  }
  return state.device;
}
