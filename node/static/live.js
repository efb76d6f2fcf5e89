// live.js: placeholder until written below
