// A real OpenID Connect provider (oidc-provider, from the npm registry) for
// tests/sso.rs. It prints {"issuer"} once it listens on loopback. Its
// development sign-in pages take any login, which becomes the subject and
// the email claim.
//
//   REDIRECT=<Plinth's callback URL> node provider.mjs
//
// `POST /test/mode` with a body of `wrong_audience`, `expired`,
// `foreign_issuer` or nothing makes the token endpoint's next ID tokens
// carry that fault, signed with the provider's own key (so only the claim
// is wrong): what Plinth must refuse.
import http from 'node:http';
import Provider from 'oidc-provider';
import * as jose from 'jose';

const server = http.createServer();
await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
const issuer = `http://127.0.0.1:${server.address().port}`;
const { privateKey } = await jose.generateKeyPair('RS256', { extractable: true });
const key = { ...(await jose.exportJWK(privateKey)), kid: 'plinth-test', use: 'sig', alg: 'RS256' };

const provider = new Provider(issuer, {
  clients: [
    {
      client_id: 'plinth',
      client_secret: 'plinth-secret',
      redirect_uris: [process.env.REDIRECT],
      grant_types: ['authorization_code'],
      response_types: ['code'],
    },
  ],
  jwks: { keys: [key] },
  pkce: { required: () => true },
  claims: { openid: ['sub'], email: ['email', 'email_verified'] },
  // The email claim in the ID token itself, as Okta, Entra ID and Google send it.
  conformIdTokenClaims: false,
  async findAccount(ctx, sub) {
    return {
      accountId: sub,
      async claims() {
        return { sub, email: sub, email_verified: !sub.startsWith('unverified') };
      },
    };
  },
});

let mode = '';
const faults = {
  wrong_audience: (claims) => ({ ...claims, aud: 'another-client' }),
  expired: (claims) => ({ ...claims, iat: claims.iat - 7200, exp: claims.iat - 3600 }),
  foreign_issuer: (claims) => ({ ...claims, iss: 'https://idp.elsewhere.example' }),
};
provider.use(async (ctx, next) => {
  await next();
  const fault = faults[mode];
  if (fault && ctx.path === '/token' && ctx.body && ctx.body.id_token) {
    const claims = fault(jose.decodeJwt(ctx.body.id_token));
    const signed = await new jose.SignJWT(claims)
      .setProtectedHeader({ alg: 'RS256', kid: key.kid, typ: 'JWT' })
      .sign(privateKey);
    ctx.body = { ...ctx.body, id_token: signed };
  }
});

const app = provider.callback();
server.on('request', (req, res) => {
  if (req.method === 'POST' && req.url === '/test/mode') {
    let body = '';
    req.on('data', (chunk) => (body += chunk));
    req.on('end', () => {
      mode = body.trim();
      res.writeHead(204).end();
    });
    return;
  }
  app(req, res);
});
// The test reads the first line; nothing written later may end the provider.
process.stdout.on('error', () => {});
process.stdout.write(`${JSON.stringify({ issuer })}\n`);
