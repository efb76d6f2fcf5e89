// sw.js
