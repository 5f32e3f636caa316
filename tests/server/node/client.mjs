// A gateway written in Node.js metering through creditmeter's JSON API.
//
//   node tests/server/node/client.mjs <base-url> <token> [user-id]
//
// Plain Node 20: the built-in fetch, no npm package. It does what a gateway
// does around a model call: check the user can pay, charge the call's usage
// (priced by creditmeter from the model and token counts), retry that charge
// with the same request_id as a gateway does after a timeout, hold credits
// before a call and settle the hold with the real usage (twice, as a retry),
// and meet a 402 with LibreChat's payload. It prints one JSON object with
// what the server answered; tests/server/test_node_client.py checks it
// against the store. Any unexpected answer exits with status 1.

const [baseUrl, token, userId = "node-gateway-user"] = process.argv.slice(2);
if (!baseUrl || !token) {
  console.error("usage: node client.mjs <base-url> <token> [user-id]");
  process.exit(2);
}

class ApiError extends Error {
  constructor(status, body) {
    super(`HTTP ${status}: ${JSON.stringify(body)}`);
    this.status = status;
    this.body = body;
  }
}

// One call of the API: JSON in, JSON out, the bearer token, a timeout.
async function call(method, path, body) {
  const response = await fetch(new URL(`/api${path}`, baseUrl), {
    method,
    headers: {
      authorization: `Bearer ${token}`,
      accept: "application/json",
      ...(body === undefined ? {} : { "content-type": "application/json" }),
    },
    body: body === undefined ? undefined : JSON.stringify(body),
    signal: AbortSignal.timeout(10_000),
  });
  const answer = await response.json();
  if (!response.ok) {
    throw new ApiError(response.status, answer);
  }
  return answer;
}

// A write that a gateway retries after a network failure: the same body, so
// the same request_id, which makes the retry harmless.
async function withRetries(method, path, body, attempts = 3) {
  for (let attempt = 1; ; attempt += 1) {
    try {
      return await call(method, path, body);
    } catch (error) {
      if (error instanceof ApiError || attempt >= attempts) throw error;
    }
  }
}

async function main() {
  const results = { user_id: userId };

  results.check = await call("POST", "/check", {
    user_id: userId,
    model: "gpt-4o-mini",
    input_tokens: 1200,
  });

  const charge = {
    user_id: userId,
    request_id: "node-call-1",
    model: "gpt-4o-mini",
    usage: { input: 1200, output: 350 },
    metadata: { gateway: "node", conversation: "c-42" },
  };
  results.charge = (await withRetries("POST", "/charge", charge)).entry;
  // The gateway did not see the answer (say it timed out) and sends the same charge again.
  results.charge_retry = (await withRetries("POST", "/charge", charge)).entry;

  results.hold = (
    await withRetries("POST", "/hold", {
      user_id: userId,
      request_id: "node-call-2",
      model: "gpt-4o",
      usage: { input: 800, output: 1000 },
    })
  ).hold;
  results.held = (await call("GET", `/users/${encodeURIComponent(userId)}`)).held;
  const settle = {
    user_id: userId,
    hold_id: results.hold.id,
    model: "gpt-4o",
    usage: { input: 800, output: 240 },
  };
  results.settle = (await withRetries("POST", "/settle", settle)).entry;
  results.settle_retry = (await withRetries("POST", "/settle", settle)).entry;

  try {
    await call("POST", "/charge", {
      user_id: userId,
      request_id: "node-call-3",
      amount: "1000000000000",
      strict: true,
    });
    results.refused = null;
  } catch (error) {
    if (!(error instanceof ApiError)) throw error;
    results.refused = { status: error.status, body: error.body };
  }

  results.account = await call("GET", `/users/${encodeURIComponent(userId)}`);
  const params = new URLSearchParams({ user_id: userId, limit: "100" });
  results.ledger = (await call("GET", `/ledger?${params}`)).entries;
  return results;
}

try {
  process.stdout.write(`${JSON.stringify(await main())}\n`);
} catch (error) {
  console.error(error instanceof ApiError ? error.message : error);
  process.exit(1);
}
