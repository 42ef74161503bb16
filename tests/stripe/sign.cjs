// Prints the Stripe-Signature header Stripe would send for the payload on
// stdin, made by Stripe's own library: `node sign.cjs SECRET [TIMESTAMP]`.
const Stripe = require('stripe');
const stripe = Stripe('sk_test_unused');
const [secret, timestamp] = process.argv.slice(2);
let payload = '';
process.stdin.on('data', (chunk) => { payload += chunk; });
process.stdin.on('end', () => {
  const options = { payload, secret };
  if (timestamp) options.timestamp = Number(timestamp);
  process.stdout.write(stripe.webhooks.generateTestHeaderString(options));
});
