// Counts calls per name in shared state; the greeting comes from a module
// of its own.
const shoal = require("shoal");
const { greet } = require("./greeting.js");

exports.handle = (input) => {
  const name = shoal.text(input).trim() || "world";
  const count = shoal.state.incr(`tally/${name}`);
  return JSON.stringify({ greeting: greet(name), count });
};
