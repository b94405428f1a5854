# unicorn-shim puts its hooks directory first on RUBYLIB for the masters it
# starts. RubyGems loads this file at interpreter start, before any `-r` of
# RUBYOPT — and so before the `-rbundler/setup` that `bundle exec` puts first
# there: the failure reporter is in place even when Bundler itself fails (a
# missing gem). It and the listener names' fix are loaded only in the process the
# shim started (and so in its forks, the workers); any other Ruby that inherits
# RUBYLIB only passes through. Then the distribution's own file of this name
# (Debian ships one that sets its gem paths) is loaded exactly as it would have been.
if ENV["UNICORN_SHIM_CHANNEL"].to_s.end_with?(":#{Process.pid}")
  require_relative "../../unicorn_shim_report"
  require_relative "../../unicorn_shim_listen"
end

here = File.expand_path(__dir__)
original = $LOAD_PATH.map { |dir| File.join(dir, "rubygems", "defaults", "operating_system.rb") }
                     .find { |path| File.expand_path(File.dirname(path)) != here && File.file?(path) }
if original
  $LOADED_FEATURES << __FILE__ unless $LOADED_FEATURES.include?(__FILE__)
  load original
end
