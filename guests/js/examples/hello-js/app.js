exports.handle = (input) => {
  const name = new TextDecoder().decode(input) || "world";
  return `hello ${name} from javascript`;
};
